"""The Python API as a user calls it: stage functions take what a Python user naturally passes, and say what is wrong."""

from __future__ import annotations

import pytest

from ndc import stages
from ndc.distill import DistillConfig
from ndc.errors import NdcError
from ndc.workspace import Workspace
from tests.conftest import TINY_RESNET


def test_partition_takes_shape_text_and_warns_of_a_teacher_with_random_weights(tmp_path, tiny_teacher):
    heard: list[str] = []
    plan, _ = stages.partition(Workspace(tmp_path / "a"), TINY_RESNET, input_shape="1,3,16,16", warn=heard.append)
    assert plan.input_shape == [1, 3, 16, 16]
    assert any("builds a model with random weights" in w and "the teacher is untrained; pass --weights" in w
               for w in heard), heard
    heard.clear()
    stages.partition(Workspace(tmp_path / "b"), TINY_RESNET, input_shape=(1, 3, 16, 16), weights=tiny_teacher,
                     warn=heard.append)
    assert not any("random weights" in w for w in heard), heard


def test_a_factory_that_loads_its_weights_is_not_called_random(tmp_path, tiny_teacher):
    factory = tmp_path / "loaded.py"
    factory.write_text(
        "from safetensors.torch import load_file\n"
        "from tests.models_for_tests import tiny_resnet\n\n"
        "def make():\n"
        "    m = tiny_resnet()\n"
        f"    m.load_state_dict(load_file({tiny_teacher!r}))\n"
        "    return m\n")
    heard: list[str] = []
    stages.partition(Workspace(tmp_path / "ws"), f"{factory}:make", input_shape="1,3,16,16", warn=heard.append)
    assert not any("random weights" in w for w in heard), heard


@pytest.mark.parametrize("kwargs, message", [
    ({"input_dtype": "int"}, "unknown --input-dtype 'int'; valid: float32, int64"),
    ({"input_shape": "1,,16"}, "bad --input-shape '1,,16'"),
])
def test_partition_refuses_bad_arguments_in_one_line(tmp_path, kwargs, message):
    with pytest.raises(NdcError, match=message):
        stages.partition(Workspace(tmp_path / "ws"), TINY_RESNET, **{"input_shape": "1,3,16,16", **kwargs})


def test_distill_takes_widths_as_numbers_and_text_and_refuses_arrays_as_data(ws):
    cfg = DistillConfig(data="digits", limit=200, steps=4, batch_size=32, val_size=64)
    result = stages.distill(Workspace(ws), [0.5, "width=0.25"], cfg)
    assert {r["spec"] for r in result.rows} == {"width=0.5", "width=0.25"}
    with pytest.raises(NdcError, match="a candidate is a Spec, a width such as 0.5"):
        stages.distill(Workspace(ws), [[0.5]], cfg)
    with pytest.raises(NdcError, match="data is a data spec such as 'fashion-mnist'.*not a tuple"):
        stages.distill(Workspace(ws), [0.5], DistillConfig(data=([1.0], None)))


def test_a_factory_with_lazy_modules_partitions(tmp_path):
    factory = tmp_path / "lazy.py"
    factory.write_text("from torch import nn\n\ndef make():\n"
                       "    return nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    plan, _ = stages.partition(Workspace(tmp_path / "ws"), f"{factory}:make", input_shape="1,16")
    assert plan.input_shape == [1, 16]


def test_integer_features_for_a_float_model_say_how_to_give_them(tmp_path):
    import numpy as np

    from ndc.data import open_data
    from ndc.passes.inputs import FLOAT

    np.savez(tmp_path / "ints.npz", x=np.arange(40 * 8).reshape(40, 8).astype(np.int64), y=np.arange(40) % 2)
    with pytest.raises(NdcError, match=r"x holds integers \(int64, 8 per example\), but the model reads floats of shape "
                                       r"\[8\]: save x as float32 if they are features"):
        open_data(str(tmp_path / "ints.npz"), (8,), inputs=FLOAT)
