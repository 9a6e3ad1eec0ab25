"""Shared fixtures. Tests run on one torch thread (two threads collapse on a busy 2-core CPU)."""

from __future__ import annotations

import os
import pathlib

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


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """Weights of ``models_for_tests:tiny_resnet`` trained briefly on digits at 3x16x16: a real teacher.

    Distillation tests need a teacher whose batch-norm statistics describe its
    activations, as any trained network's do; a freshly initialised one is not.
    """
    from safetensors.torch import save_file

    from ndc.data import open_data
    from ndc.finetune import TrainConfig, train
    from tests.models_for_tests import tiny_resnet

    torch.manual_seed(0)
    model = tiny_resnet()
    data = open_data("digits", (3, 16, 16), limit=400)
    train(model, data, TrainConfig(loss="ce", epochs=2, lr=0.05, batch_size=32, augment=False))
    path = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def fit_on_digits(model: torch.nn.Module, epochs: int, after_step=None) -> None:
    """Train ``model`` by cross entropy on 600 digits at 1x8x8 (Adam, batch 128); ``after_step()`` runs after every step."""
    from ndc.data import open_data

    data = open_data("digits", (1, 8, 8), limit=600)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for epoch in range(epochs):
        for x, y in data.batches("train", 128, shuffle=True, epoch=epoch):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()


def calibrated_weights(model: torch.nn.Module, shape, path) -> str:
    """Save ``model``'s weights after setting its batch-norm statistics from real data (digits)."""
    from safetensors.torch import save_file

    from ndc.data import open_data
    from ndc.stitch import recalibrate_batchnorm

    recalibrate_batchnorm(model, open_data("digits", shape, limit=256), batches=4, batch_size=64)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


TINY_RESNET = f"{os.path.dirname(os.path.abspath(__file__))}/models_for_tests.py:tiny_resnet"


def cli_workspace(folder, tiny_teacher: str, *commands: list[str]):
    """A workspace at ``folder`` where the tiny ResNet teacher is partitioned, then each of ``commands`` run (as the CLI)."""
    from click.testing import CliRunner

    from ndc.cli import main

    runner = CliRunner()
    for args in (["partition", TINY_RESNET, "--weights", tiny_teacher, "--input-shape", "1,3,16,16"], *commands):
        r = runner.invoke(main, [*map(str, args), "-w", str(folder)])
        assert r.exit_code == 0, (args, r.output)
    return folder


def copy_of(workspace, tmp_path):
    """A fresh copy of a module's prepared workspace for one test (``tmp_path/ndc-work``, the CLI's default)."""
    import shutil

    shutil.copytree(workspace, tmp_path / "ndc-work")
    return tmp_path / "ndc-work"


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory, tiny_teacher):
    """The tiny ResNet teacher partitioned (3 residual blocks), once per test module; tests take a copy (``ws``)."""
    return cli_workspace(tmp_path_factory.mktemp("tiny") / "ws", tiny_teacher)


@pytest.fixture
def ws(partitioned, tmp_path):
    """A fresh copy of the module's prepared workspace (modules that prepare more define their own)."""
    return copy_of(partitioned, tmp_path)


def distill_json(run_cli, *args):
    """``ndc distill ARGS --format json``: the click result and the parsed document (None when there is none)."""
    import json

    r = run_cli("distill", *args, "--format", "json")
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


class NoiseBatch:
    """A batch for driving one trainer by hand: ReLU'd noise at ``part``'s input, ``part``'s output the target."""

    def __init__(self, part, seed: int, size: int = 8):
        shape = part.graph.find_nodes(op="placeholder")[0].meta["tensor_meta"].shape[1:]
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(size, *shape, generator=g).relu()
        self.t = part.eval()(self.a).detach()

    def pair(self, index, lookahead):
        return self.a, [self.t]


def train_steps(trainer, part, seeds) -> None:
    """One optimiser step of ``trainer`` per seed, each on its own :class:`NoiseBatch` (torch seeded too: gate noise)."""
    for s in seeds:
        torch.manual_seed(s)
        trainer.zero_grad()
        trainer.loss(NoiseBatch(part, s)).backward()
        trainer.step()


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (read from /proc)."""
    parents = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """``pid`` is a live process (not gone, not a zombie)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
