"""The rewrite pass on every model family: width students, records, isolation, preview."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.load import LoadedModel
from ndc.metrics import count_params
from ndc.passes.extract import extract
from ndc.passes.rewrite import (
    analyse,
    format_preview,
    make_student,
    preview,
    rebuild_student,
    student_size,
)
from ndc.passes.trace import trace
from ndc.plan import partition_model
from ndc.zoo import FAMILIES


@functools.lru_cache(maxsize=None)
def _teacher(family: str):
    factory, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = factory()
    _randomise_norms(model)
    plan, traced = partition_model(LoadedModel(model, {"kind": "test"}), shape)
    return model, plan, traced


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial batch-norm statistics, so slicing them wrongly would show in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def part_of(family: str, name: str) -> tuple[torch.fx.GraphModule, list[int]]:
    """A fresh teacher neighbourhood (a deep copy) and its input shape."""
    _, plan, traced = _teacher(family)
    nb = plan[name]
    return extract(traced.gm, nb.input, nb.output, nb.nodes), list(nb.input_shape)


def family_parts() -> list[tuple[str, str]]:
    """Two trainable neighbourhoods per family (the whole MLP, whose plan keeps it all with the teacher)."""
    cases = []
    for family in FAMILIES:
        _, plan, _ = _teacher(family)
        names = [nb.name for nb in plan.trainable][:2]
        cases += [(family, n) for n in names] or [(family, "*")]
    return cases


def get_part(family: str, name: str):
    if name == "*":
        _, plan, traced = _teacher(family)
        return copy.deepcopy(traced.gm), list(plan.input_shape)
    return part_of(family, name)


CASES = family_parts()
IDS = [f"{f}:{n}" for f, n in CASES]


# ------------------------------------------------------------- every family


@pytest.mark.parametrize("family,name", CASES, ids=IDS)
def test_width_one_reproduces_the_teacher_exactly(family, name):
    part, shape = get_part(family, name)
    part.eval()
    student = make_student(part, Spec(width=1.0))
    x = torch.randn([3] + shape[1:])
    assert torch.equal(student.module(x), part(x))
    assert student.record["dims"] == {}
    assert not any(row["shrunk"] for row in student.report)


@pytest.mark.parametrize("family,name", CASES, ids=IDS)
def test_half_width_keeps_shapes_shrinks_and_trains_without_touching_the_teacher(family, name):
    part, shape = get_part(family, name)
    part.train()
    x = torch.randn([4] + shape[1:])
    expected = part(x).shape
    before = {k: v.clone() for k, v in part.state_dict().items()}
    student = make_student(part, Spec(width=0.5))
    assert student.module.training
    y = student.module(x)
    assert y.shape == expected
    if any(row["shrunk"] for row in student.report):
        assert count_params(student.module) < count_params(part)
    opt = torch.optim.SGD(student.module.parameters(), lr=0.1)
    loss = (y - torch.randn_like(y)).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in student.module.parameters() if p.requires_grad)
    opt.step()
    student.module(x)  # another step's forward pass updates batch-norm statistics
    after = part.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_students_never_share_tensors_with_the_teacher_model():
    model, plan, traced = _teacher("resnet20")
    nb = plan["layer1.0"]
    part = extract(traced.gm, nb.input, nb.output, nb.nodes)
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    for spec in (Spec(width=1.0), Spec(width=0.5)):
        student = make_student(part, spec)
        ptrs = {t.data_ptr() for t in list(part.parameters()) + list(model.parameters())}
        assert not any(p.data_ptr() in ptrs for p in student.module.parameters())
        with torch.no_grad():
            for p in student.module.parameters():
                p.add_(1.0)
    assert all(torch.equal(teacher[k], v) for k, v in model.state_dict().items())


def test_analysis_does_not_modify_the_neighbourhood():
    part, _ = part_of("vit", "blocks.0.attn")
    code, state = part.code, {k: v.clone() for k, v in part.state_dict().items()}
    analyse(part)
    make_student(part, Spec(width=0.5))
    assert part.code == code
    assert all(torch.equal(state[k], v) for k, v in part.state_dict().items())


def test_eval_mode_is_copied():
    part, _ = part_of("resnet20", "layer1.0")
    part.eval()
    assert not make_student(part, Spec(width=0.5)).module.training


# ----------------------------------------------------------- named families


def test_resnet20_block_halves_its_inner_width():
    part, _ = part_of("resnet20", "layer1.0")
    assert count_params(part) == 4672
    student = make_student(part, Spec(width=0.5))
    m = student.module
    assert count_params(m) == 2352
    assert m.get_submodule("layer1.0.conv1").weight.shape == (8, 16, 3, 3)
    assert m.get_submodule("layer1.0.conv1").out_channels == 8
    bn1 = m.get_submodule("layer1.0.bn1")
    assert bn1.num_features == 8 and bn1.running_mean.shape == (8,) and bn1.running_var.shape == (8,)
    assert m.get_submodule("layer1.0.conv2").weight.shape == (16, 8, 3, 3)
    assert m.get_submodule("layer1.0.conv2").in_channels == 8
    rows = {r["dim"]: r for r in student.report}
    assert rows["layer1.0.conv1.out_channels"]["student"] == 8
    assert rows["layer1.0.conv2.out_channels"] == {
        "dim": "layer1.0.conv2.out_channels", "teacher": 16, "student": 16, "shrunk": False,
        "why": "neighbourhood input (boundary)"}


def test_resnet20_student_computes_the_teacher_with_dropped_channels_silenced():
    """Slicing is consistent: the student equals the teacher whose dropped bn1 channels output zero."""
    part, _ = part_of("resnet20", "layer2.1")
    part.eval()
    student = make_student(part, Spec(width=0.5))
    kept = torch.tensor(student.record["dims"]["layer2.1.conv1.out_channels"]["kept"])
    silenced = copy.deepcopy(part)
    bn1 = silenced.get_submodule("layer2.1.bn1")
    dropped = torch.ones(32, dtype=torch.bool)
    dropped[kept] = False
    with torch.no_grad():
        bn1.weight[dropped] = 0
        bn1.bias[dropped] = 0
    x = torch.randn(2, 32, 16, 16)
    student.module.eval()
    torch.testing.assert_close(student.module(x), silenced(x), rtol=1e-5, atol=1e-5)


def test_teacher_init_keeps_the_filters_with_the_largest_l1_norm():
    part, _ = part_of("resnet20", "layer1.0")
    student = make_student(part, Spec(width=0.5))
    w = part.get_submodule("layer1.0.conv1").weight
    top = torch.sort(torch.argsort(-w.abs().sum(dim=(1, 2, 3)))[:8]).values
    assert student.record["dims"]["layer1.0.conv1.out_channels"]["kept"] == top.tolist()
    torch.testing.assert_close(student.module.get_submodule("layer1.0.conv1").weight, w[top])


def test_option_a_shortcut_padding_stays_and_the_block_still_shrinks():
    part, _ = part_of("resnet20", "layer2.0")
    student = make_student(part, Spec(width=0.5))
    rows = {r["dim"]: r for r in student.report}
    assert rows["layer2.0.conv1.out_channels"]["student"] == 16
    assert any("padding added by pad" in r["why"] for r in student.report)
    assert student.module(torch.randn(2, 16, 32, 32)).shape == (2, 32, 16, 16)


def test_mobilenetv2_block_shrinks_the_expanded_dimension_and_its_depthwise_conv():
    part, shape = part_of("mobilenetv2", "features.2")
    student = make_student(part, Spec(width=0.5))
    m = student.module
    assert m.get_submodule("features.2.conv.0").weight.shape == (48, 16, 1, 1)
    dw = m.get_submodule("features.2.conv.3")
    assert dw.weight.shape == (48, 1, 3, 3) and dw.groups == 48 and dw.in_channels == dw.out_channels == 48
    assert m.get_submodule("features.2.conv.6").weight.shape == (16, 48, 1, 1)
    assert m(torch.randn(2, *shape[1:])).shape == (2, 16, 32, 32)
    rows = {r["dim"]: r for r in student.report}
    assert rows["features.2.conv.0.out_channels"] == {
        "dim": "features.2.conv.0.out_channels", "teacher": 96, "student": 48, "shrunk": True,
        "why": rows["features.2.conv.0.out_channels"]["why"]}
    assert "features.2.conv.3.in_channels" in rows["features.2.conv.0.out_channels"]["why"]


def test_densenet_layer_shrinks_its_bottleneck_and_keeps_the_concatenated_output():
    part, shape = part_of("densenet", "features.0.1")
    student = make_student(part, Spec(width=0.5))
    m = student.module
    assert m.get_submodule("features.0.1.conv1").weight.shape == (24, 36, 1, 1)
    assert m.get_submodule("features.0.1.bn2").num_features == 24
    assert m.get_submodule("features.0.1.conv2").weight.shape == (12, 24, 3, 3)
    assert m(torch.randn(2, *shape[1:])).shape == (2, 48, 32, 32)
    rows = {r["dim"]: r for r in student.report}
    assert rows["features.0.1.bn1.num_features"]["why"] == "neighbourhood input (boundary)"
    assert rows["features.0.1.conv2.out_channels"]["why"] == "neighbourhood output (boundary)"


def test_transformer_mlp_hidden_dimension_shrinks():
    part, shape = part_of("vit", "blocks.0.mlp")
    student = make_student(part, Spec(width=0.5))
    m = student.module
    assert m.get_submodule("blocks.0.mlp.fc1").weight.shape == (128, 64)
    assert m.get_submodule("blocks.0.mlp.fc2").weight.shape == (64, 128)
    assert m.get_submodule("blocks.0.norm2").normalized_shape == (64,)
    assert m(torch.randn(2, *shape[1:])).shape == (2, 65, 64)


def test_attention_keeps_whole_heads():
    """The student keeps the most important heads whole (q, k and v alike): the teacher with the other heads zeroed."""
    part, shape = part_of("vit", "blocks.0.attn")
    part.eval()
    student = make_student(part, Spec(width=0.5))
    m = student.module
    assert m.get_submodule("blocks.0.attn.qkv").weight.shape == (96, 64)
    assert m.get_submodule("blocks.0.attn.proj").weight.shape == (64, 32)
    (entry,) = student.record["dims"].values()
    kept = torch.tensor(entry["kept"])
    assert entry["teacher"] == 4 and len(kept) == 2  # heads of 16 channels
    silenced = copy.deepcopy(part)
    qkv = silenced.get_submodule("blocks.0.attn.qkv")
    dropped = torch.ones(4, dtype=torch.bool)
    dropped[kept] = False
    rows = dropped.repeat_interleave(16).repeat(3)  # q, k and v of the dropped heads
    with torch.no_grad():
        qkv.weight[rows] = 0
        qkv.bias[rows] = 0
    x = torch.randn(2, *shape[1:])
    torch.testing.assert_close(m(x), silenced(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- records and rebuild


@pytest.mark.parametrize("family,name", [("resnet20", "layer2.0"), ("mobilenetv2", "features.2"),
                                         ("densenet", "features.0.0"), ("vit", "blocks.0.attn"),
                                         ("vit", "blocks.0.mlp"), ("mlp", "*")])
def test_a_trained_student_is_rebuilt_from_its_spec_and_json_record(family, name):
    part, shape = get_part(family, name)
    spec = Spec(width=0.5)
    student = make_student(part, spec)
    with torch.no_grad():
        for p in student.module.parameters():
            p.add_(torch.randn_like(p))
    record = json.loads(json.dumps(student.record))
    rebuilt = rebuild_student(part, spec, record)
    rebuilt.load_state_dict(student.module.state_dict(), strict=True)
    student.module.eval()
    rebuilt.eval()
    x = torch.randn(2, *shape[1:])
    assert torch.equal(rebuilt(x), student.module(x))


def test_rebuild_rejects_a_record_that_does_not_fit():
    part, _ = part_of("resnet20", "layer1.0")
    student = make_student(part, Spec(width=0.5))
    record = student.record
    with pytest.raises(NdcError, match="made for spec 'width=0.5', not 'width=0.25'"):
        rebuild_student(part, Spec(width=0.25), record)
    other, _ = part_of("resnet20", "layer1.1")
    with pytest.raises(NdcError, match="does not match this neighbourhood"):
        rebuild_student(other, Spec(width=0.5), record)
    bad = copy.deepcopy(record)
    bad["dims"]["layer1.0.conv1.out_channels"]["kept"] = [0, 0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(NdcError, match="bad channels for layer1.0.conv1.out_channels"):
        rebuild_student(part, Spec(width=0.5), bad)
    with pytest.raises(NdcError, match="bad student record"):
        rebuild_student(part, Spec(width=0.5), {"dims": []})


def test_random_init_has_the_same_architecture_and_fresh_seeded_weights():
    part, _ = part_of("resnet20", "layer1.0")
    spec = Spec(width=0.5)
    teacher_init = make_student(part, spec)
    rng = torch.get_rng_state()
    a = make_student(part, spec, init="random", seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is left alone
    b = make_student(part, spec, init="random", seed=3)
    c = make_student(part, spec, init="random", seed=4)
    shapes = {k: v.shape for k, v in teacher_init.module.state_dict().items()}
    assert {k: v.shape for k, v in a.module.state_dict().items()} == shapes
    w = "layer1.0.conv1.weight"
    assert not torch.equal(a.module.state_dict()[w], teacher_init.module.state_dict()[w])
    assert torch.equal(a.module.state_dict()[w], b.module.state_dict()[w])
    assert not torch.equal(a.module.state_dict()[w], c.module.state_dict()[w])
    assert torch.equal(a.module.state_dict()["layer1.0.bn1.running_var"], torch.ones(8))
    rebuilt = rebuild_student(part, spec, a.record)
    rebuilt.load_state_dict(a.module.state_dict(), strict=True)


# -------------------------------------------------------- rounding, errors


def test_student_size_rounds_and_never_exceeds_the_teacher():
    assert student_size(16, 0.5) == 8
    assert student_size(16, 0.01) == 1
    assert student_size(3, 0.5) == 2
    assert student_size(96, 0.3, round_to=8) == 32
    assert student_size(96, 0.01, round_to=8) == 8
    assert student_size(6, 0.5, round_to=8) == 6
    assert student_size(16, 1.0, round_to=5) == 16
    assert student_size(16, 0.95, round_to=5) == 15


def test_round_to_gives_multiples():
    part, _ = part_of("mobilenetv2", "features.9")
    student = make_student(part, Spec(width=0.3), round_to=16)
    (entry,) = student.record["dims"].values()
    assert len(entry["kept"]) == 80 and entry["teacher"] == 288  # 86.4 -> 86 -> nearest multiple of 16


@pytest.mark.parametrize("kwargs,message", [
    ({"round_to": 0}, "round_to must be an integer >= 1, got 0"),
    ({"round_to": 2.5}, "round_to must be an integer >= 1"),
    ({"init": "zeros"}, "unknown init 'zeros'; choose from: teacher, random"),
    ({"seed": "x"}, "seed must be an integer"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    part, _ = part_of("resnet20", "layer1.0")
    with pytest.raises(NdcError) as e:
        make_student(part, Spec(width=0.5), **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_module_without_shapes_is_refused():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)))
    with pytest.raises(NdcError, match="one input with shape metadata"):
        make_student(gm, Spec(width=0.5))
    with pytest.raises(NdcError, match="expected a torch.fx.GraphModule"):
        make_student(torch.nn.Linear(2, 2), Spec(width=0.5))
    traced = trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), (1, 4))
    with pytest.raises(NdcError, match="expected an ndc.ir.Spec"):
        make_student(traced.gm, "width=0.5")


# ----------------------------------------------------------------- preview


def test_preview_reports_sizes_and_dims_as_json():
    part, shape = part_of("resnet20", "layer1.0")
    row = preview(part, Spec(width=0.5), "layer1.0", shape)
    assert {"neighbourhood", "spec", "teacher_params", "student_params", "student_flops", "kept_dims",
            "shrunk_dims"} <= row.keys()
    assert row["neighbourhood"] == "layer1.0" and row["spec"] == "width=0.5"
    assert (row["teacher_params"], row["student_params"]) == (4672, 2352)
    assert 0 < row["student_flops"] < row["teacher_flops"]
    assert [d["dim"] for d in row["shrunk_dims"]] == ["layer1.0.conv1.out_channels"]
    assert [d["why"] for d in row["kept_dims"]] == ["neighbourhood input (boundary)"]
    json.dumps({"candidates": [row]})
    text = format_preview([row])
    assert "layer1.0" in text and "4,672" in text and "2,352" in text and "50.3%" in text
    assert "shrunk  layer1.0.conv1.out_channels: 16 -> 8" in text
    assert "neighbourhood input (boundary)" in text


def test_preview_counts_nonzero_parameters_of_a_sparse_student():
    part, shape = part_of("resnet20", "layer1.0")
    row = preview(part, Spec(sparsity=0.5), "layer1.0", shape)
    assert row["student_params"] == 4672
    assert row["student_nonzero_params"] == 4672 - 2 * 1152
    assert "non-zero" in format_preview([row])
    assert format_preview([]) == "no candidates\n"
