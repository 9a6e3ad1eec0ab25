"""Width students of CNNs traced by the torch.export frontend: the ATen conv / batch-norm / pooling rules.

An exported graph calls ``aten.conv2d`` and ``aten.batch_norm`` on ``get_attr``
weights where an fx graph calls ``nn.Conv2d`` and ``nn.BatchNorm2d``; the two
frontends must give the same students (same channels, same sizes, same
report), and what has no rule must say so in ``ndc distill --dry-run``.
This file is also the factory file the CLI tests load (``THIS:bn_net``).
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

THIS = pathlib.Path(__file__).resolve()


# ------------------------------------------------------------------ models (factories for the CLI)


class Block(nn.Module):
    """conv -> bn -> relu -> conv -> bn, plus the residual, then relu."""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class BnNet(nn.Module):
    input_shape = (1, 1, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.l1, self.l2 = Block(16), Block(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.l2(self.l1(x)).mean((2, 3)))


def _stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so batch norm slicing is visible in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return _stats(BnNet())


class CumsumBlock(nn.Module):
    """A channel cumulative sum between two convs: ``aten.cumsum`` has no rewrite rule."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.cumsum(torch.relu(self.a(x)), 1))


class CumsumNet(nn.Module):
    input_shape = (1, 1, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.l1 = CumsumBlock()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.l1(torch.relu(self.stem(x))).mean((2, 3)))


def cumsum_net() -> nn.Module:
    torch.manual_seed(0)
    return CumsumNet().eval()


class Wide(nn.Module):
    """Most CNN operators at once: depthwise conv, group/instance norm, transposed and 1-d convs, pooling, padding."""

    def __init__(self, grouped: bool = False):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.nb = nn.Conv2d(16, 16, 1, bias=False)
        self.dw, self.gn = nn.Conv2d(16, 32, 3, padding=1, groups=16), nn.GroupNorm(4, 32)
        self.g = nn.Conv2d(32, 32, 1, groups=4) if grouped else nn.Identity()
        self.ct, self.inn = nn.ConvTranspose2d(32, 8, 2, stride=2), nn.InstanceNorm2d(8, affine=True)
        self.c1, self.fc = nn.Conv1d(8, 12, 1), nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.a(x)), inplace=True)  # exports as aten.relu_
        x = F.max_pool2d(self.nb(x) + x, 2)
        x = self.g(self.gn(self.dw(x)))
        x = F.pad(self.inn(self.ct(x)), (1, 1))
        x = F.adaptive_avg_pool2d(x, 1).flatten(2)
        return self.fc(self.c1(x).amax(-1))


def wide(grouped: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return _stats(Wide(grouped))


# ------------------------------------------------------------------ helpers


def _json(run_cli, *args):
    r = run_cli(*args, "--format", "json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def _dry_run(run_cli, tmp_path, factory: str, frontend: str) -> dict:
    ws = tmp_path / frontend
    doc = _json(run_cli, "partition", f"{THIS}:{factory}", "--frontend", frontend, "-w", ws)
    assert doc["frontend"] == ("torch.export" if frontend == "export" else "torch.fx")
    rows = _json(run_cli, "distill", "--width", "0.5", "--dry-run", "-w", ws)["candidates"]
    return {row["neighbourhood"]: row for row in rows}


def _students(model: nn.Module, shape, frontend: str, width: float = 0.5):
    from ndc.ir import Spec
    from ndc.passes.rewrite import make_student
    from ndc.passes.trace import trace

    gm = trace(model, shape, frontend=frontend).gm
    return gm, make_student(gm, Spec(width=width))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rows(student) -> list[tuple]:
    return [(r["dim"], r["teacher"], r["student"], r["why"]) for r in student.report]


# ------------------------------------------------------------------ the CLI, as the QA report ran it


def test_export_frontend_narrows_a_cnn_exactly_like_fx(run_cli, tmp_path):
    fx_rows = _dry_run(run_cli, tmp_path, "bn_net", "fx")
    ex_rows = _dry_run(run_cli, tmp_path, "bn_net", "export")
    assert set(ex_rows) == set(fx_rows) == {"l1", "l2"}
    for name, fx_row in fx_rows.items():
        ex = ex_rows[name]
        assert (ex["teacher_params"], ex["student_params"], ex["student_flops"]) == \
            (fx_row["teacher_params"], fx_row["student_params"], fx_row["student_flops"])
        assert ex["student_params"] < ex["teacher_params"]
        assert [d["dim"] for d in ex["shrunk_dims"]] == [d["dim"] for d in fx_row["shrunk_dims"]] == \
            [f"{name}.c1.out_channels"]
        assert [(d["teacher"], d["student"]) for d in ex["shrunk_dims"]] == [(16, 8)]
        assert [(d["dim"], d["why"]) for d in ex["kept_dims"]] == [(d["dim"], d["why"]) for d in fx_row["kept_dims"]]
        assert ex["kept_dims"] and all(d["why"] for d in ex["kept_dims"])


def test_export_frontend_distils_and_stitches_a_smaller_cnn(run_cli, tmp_path):
    data = ["--data", "digits", "--limit", "200"]
    _json(run_cli, "partition", f"{THIS}:bn_net", "--frontend", "export")
    doc = _json(run_cli, "distill", "--width", "0.5", *data, "--steps", "5", "--batch-size", "32", "--val-size", "64",
                "--quiet")
    assert [c["status"] for c in doc["candidates"]] == ["done", "done"]
    assert all(c["student_params"] < c["teacher_params"] for c in doc["candidates"])
    doc = _json(run_cli, "stitch", "-o", "s.pt2", "--width", "0.5", *data)
    assert doc["selection"] == {"l1": "width=0.5", "l2": "width=0.5"}
    assert doc["params"] < doc["teacher_params"]
    student = torch.export.load(str(tmp_path / "s.pt2")).module()
    assert _params(student) < _params(bn_net())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert student(x).shape == bn_net()(x).shape == (5, 10)


def test_an_operator_without_a_rule_is_pinned_with_its_reason_in_the_dry_run(run_cli, tmp_path):
    ws = tmp_path / "ws"
    _json(run_cli, "partition", f"{THIS}:cumsum_net", "--frontend", "export", "-w", ws)
    text = run_cli("distill", "--width", "0.5", "--dry-run", "-w", ws).stdout
    assert "kept    l1.a.out_channels: 16 (touched by cumsum (call_function cumsum.default), which has no rewrite rule)" \
        in text, text
    row = _json(run_cli, "distill", "--width", "0.5", "--dry-run", "-w", ws)["candidates"][0]
    assert row["shrunk_dims"] == [] and row["student_params"] == row["teacher_params"]
    assert {d["dim"]: d["why"] for d in row["kept_dims"]}["l1.a.out_channels"].endswith("which has no rewrite rule")


# ------------------------------------------------------------------ the rules, on whole graphs


@pytest.mark.parametrize("grouped", [False, True])
def test_aten_conv_rules_give_the_fx_student(grouped):
    model, shape = wide(grouped), (1, 3, 16, 16)
    x = torch.randn(3, 3, 16, 16)
    fx_gm, fx_student = _students(model, shape, "fx")
    ex_gm, ex_student = _students(model, shape, "export")
    assert _rows(ex_student) == _rows(fx_student)
    assert _params(ex_student.module) == _params(fx_student.module) < _params(ex_gm)
    assert ex_student.record["dims"] == fx_student.record["dims"]
    with torch.no_grad():
        torch.testing.assert_close(ex_student.module(x), fx_student.module(x))
        assert torch.equal(_students(model, shape, "export", 1.0)[1].module(x), ex_gm(x))
    shrunk = {r[0] for r in _rows(ex_student) if r[2] < r[1]}
    assert {"ct.out_channels", "c1.out_channels"} <= shrunk
    if grouped:  # the grouped conv keeps its channels, and says so
        assert ("g.out_channels", 32, 32, "grouped convolution g (groups=4) keeps its channels") in _rows(ex_student)
    else:  # depthwise: the student's groups follow its channels
        assert any(r[0].startswith("a.out_channels") for r in _rows(ex_student) if r[2] < r[1])
        dw = next(n for n in ex_student.module.graph.nodes if n.target == torch.ops.aten.conv2d.default
                  and n.args[1].target == "dw.weight")
        assert dw.args[6] == ex_student.module.get_parameter("dw.weight").shape[0] // 2 < 16


def test_a_decomposed_archive_narrows_convolution_and_batch_norm(tmp_path):
    """``.pt2`` archives saved after ``run_decompositions`` call ``aten.convolution`` and
    ``aten._native_batch_norm_legit_no_training`` (three outputs, read by ``getitem``)."""
    from ndc.passes.trace_export import load_program

    model = bn_net()
    program = torch.export.export(model, (torch.randn(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},)).run_decompositions()
    torch.export.save(program, str(tmp_path / "m.pt2"))
    gm, shape, _ = load_program(torch.export.load(str(tmp_path / "m.pt2")), "m.pt2")
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.convolution.default in targets
    assert torch.ops.aten._native_batch_norm_legit_no_training.default in targets
    _, decomposed = _students(gm, shape, "export")
    _, fx_student = _students(model, shape, "fx")
    assert _rows(decomposed) == _rows(fx_student)
    # the whole graph: the residual stream is internal too (decomposed nn.Linear: addmm(bias, x, permute(weight)))
    assert {r[0] for r in _rows(decomposed) if r[2] < r[1]} == {"stem.out_channels", "l1.c1.out_channels",
                                                                "l2.c1.out_channels"}
    assert _params(decomposed.module) == _params(fx_student.module)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(decomposed.module(x), fx_student.module(x))
