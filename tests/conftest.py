"""Shared fixtures. Tests run on one torch thread (two threads collapse on a busy 2-core CPU)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run ``ndc ARGS`` in an isolated directory; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from ndc.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)

    return run
