"""docs/cli.md is exactly what the commands' --help says."""

from __future__ import annotations

import pathlib

from ndc.cli import COMMANDS, main
from ndc.clidoc import render

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_cli_reference_matches_help():
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `python -m ndc.clidoc > docs/cli.md`"


def test_every_command_is_registered_and_documented():
    from click.testing import CliRunner

    out = CliRunner().invoke(main, ["--help"]).output
    for name in COMMANDS:
        assert name in out
        assert f"## ndc {name}" in DOC.read_text()
