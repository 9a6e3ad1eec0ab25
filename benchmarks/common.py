"""Shared pieces of the benchmarks: the cached teacher, workspaces, timing, and result files.

The teacher of every paper benchmark is the CIFAR ResNetV1-20 (option A
shortcuts) trained by cross entropy on the full Fashion-MNIST training set,
images repeated to 3 channels and zero-padded to 32 x 32. Training it takes
about 20 minutes on the 2-core development machine, so it is trained once and
kept in ``benchmarks/results/cache/`` (git-ignored); every later run reuses it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ndc.data import open_data  # noqa: E402
from ndc.finetune import TrainConfig, accuracy, train  # noqa: E402
from ndc.load import load_model  # noqa: E402
from ndc.plan import load_teacher, partition_model, write_plan  # noqa: E402
from ndc.workspace import Workspace  # noqa: E402

RESULTS = Path(os.environ.get("NDC_BENCH_RESULTS") or ROOT / "benchmarks" / "results")  # result files (tests use their own)
CACHE = Path(os.environ.get("NDC_BENCH_CACHE") or RESULTS / "cache")  # teachers and workspaces (tests use their own)
DATA = "fashion-mnist"
INPUT_SHAPE = (1, 3, 32, 32)
TEACHER = CACHE / "teacher-resnet20-fmnist.safetensors"
TEACHER_EPOCHS = 10


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def teacher_weights(threads: int = 2) -> Path:
    """The trained ResNet-20 teacher's weights, trained now if not cached."""
    return cached_teacher("resnet20-fmnist", "ndc.zoo:resnet20", TEACHER_EPOCHS, threads=threads)


SMALL_TEACHER_EPOCHS = 8  # the ResNet-20 teacher of bench_pareto.py and ``bench_paper.py --teacher-examples``


def small_teacher_name(examples: int) -> str:
    return f"resnet20-fmnist-{examples // 1000}k"


def small_teacher(examples: int) -> Path:
    """A ResNet-20 teacher trained on the first ``examples`` images for a few epochs (minutes, not half an hour)."""
    return cached_teacher(small_teacher_name(examples), "ndc.zoo:resnet20", SMALL_TEACHER_EPOCHS, examples)


def cached_teacher(name: str, factory: str, epochs: int, examples: int | None = None, threads: int = 2,
                   input_shape: tuple[int, ...] = INPUT_SHAPE) -> Path:
    """Weights of ``factory`` trained by cross entropy on Fashion-MNIST (the first ``examples`` images), cached as
    ``cache/teacher-<name>.safetensors`` with a JSON beside it; trained now if not cached."""
    path = CACHE / f"teacher-{name}.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file

    CACHE.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = open_data(DATA, input_shape[1:], limit=examples)
    model = load_model(factory).model
    log(f"training the {name} teacher on {data.train_size} images for {epochs} epochs (once; cached)")
    t = time.perf_counter()
    result = train(model, data, TrainConfig(loss="ce", epochs=epochs, lr=0.1, batch_size=128, seed=0),
                   log=lambda e: e.get("event") == "epoch" and log(f"  epoch {e['epoch']}: {e['accuracy']:.2%}"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (CACHE / f"teacher-{name}.json").write_text(json.dumps(
        {"accuracy": result["best_accuracy"], "seconds": time.perf_counter() - t, "epochs": epochs,
         "train_examples": data.train_size, "machine": machine()}, indent=2))
    return path


def teacher_info(name: str = "resnet20-fmnist") -> dict:
    path = CACHE / f"teacher-{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def workspace(name: str, fresh: bool = False, factory: str = "ndc.zoo:resnet20", weights: Path | None = None,
              input_shape: tuple[int, ...] = INPUT_SHAPE) -> Workspace:
    """A workspace under benchmarks/results/cache/ holding the partitioned teacher (--by residual; ResNet-20 by default)."""
    import shutil

    ws = Workspace(CACHE / name)
    if fresh and ws.root.exists():
        shutil.rmtree(ws.root)
    if not ws.exists("plan.json"):
        loaded = load_model(factory, weights=str(weights or teacher_weights()))
        plan, _ = partition_model(loaded, input_shape, by="residual")
        write_plan(ws, plan, loaded.model)
    return ws


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    log(f"wrote {path}")
    return path


__all__ = ["open_data", "TrainConfig", "accuracy", "train", "load_teacher", "Workspace", "teacher_weights", "workspace",
           "machine", "log", "median", "spread", "write", "DATA", "INPUT_SHAPE", "RESULTS", "CACHE", "teacher_info",
           "cached_teacher", "small_teacher", "small_teacher_name", "SMALL_TEACHER_EPOCHS"]
