"""``ndc demo``: the whole pipeline on a teacher and data that need nothing but the install.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` when it is
installed, else scikit-learn's bundled digits. Teacher: a CIFAR-style
ResNet-14 (six residual blocks, 8 base channels) for one-channel 28 × 28
images, trained on the fly by cross entropy and kept in the workspace, so a
second run skips it. Then, timed stage by stage, exactly what a user runs::

    ndc partition ndc.zoo:demo_teacher --weights demo/teacher-<key>.safetensors --input-shape 1,1,28,28
    ndc distill --width 0.5 --data SPEC --workers 2
    ndc stitch -o student.onnx --data SPEC
    ndc finetune --data SPEC --epochs E -o student.onnx

and, for comparison, the same student architecture trained from scratch by
end-to-end KD for the same wall time as distillation plus fine-tuning.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ndc.errors import NdcError
from ndc.workspace import LOCK, Workspace, sha256_json

FASHION = Path("/usr/share/datasets/fashion-mnist")
INPUT_SHAPE = (1, 1, 28, 28)


@dataclass
class DemoConfig:
    data: str | None = None  # default: fashion-mnist if installed, else digits
    limit: int | None = 10_000
    width: float = 0.5
    workers: int = 2
    teacher_epochs: int = 10
    distill_epochs: int = 4
    finetune_epochs: int = 2
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        from ndc.ir import Spec

        Spec(width=self.width)  # a bad --width is one line before the teacher trains, not after


def default_data() -> str:
    return "fashion-mnist" if FASHION.is_dir() else "digits"


@contextlib.contextmanager
def _gone_if_nothing_kept(ws: Workspace) -> Iterator[None]:
    """A workspace this run creates is removed again when it fails before writing anything but its lock (bad
    --data): no empty folder is left behind."""
    fresh = not ws.root.exists()
    try:
        yield
    except BaseException:
        if fresh and ws.root.is_dir() and all(p.name == LOCK for p in ws.root.iterdir()):
            shutil.rmtree(ws.root, ignore_errors=True)
        raise


def run_demo(ws: Workspace, cfg: DemoConfig, log=lambda message: None) -> dict:
    """Run every stage (:mod:`ndc.stages`, as the commands do); returns the numbers of the final table."""
    from ndc import stages
    from ndc.data import open_data
    from ndc.distill import DistillConfig
    from ndc.finetune import TrainConfig, train
    from ndc.ir import Spec
    from ndc.load import load_model
    from ndc.metrics import count_flops, count_params
    from ndc.passes.export import export_model
    from ndc.plan import load_teacher, partition_model, write_plan

    data_spec = cfg.data or default_data()
    stages.one_device(cfg.device)  # no GPU: one line now, not after training a teacher
    times: dict[str, float] = {}
    with _gone_if_nothing_kept(ws), ws.writing("ndc demo", create=True):
        data = open_data(data_spec, INPUT_SHAPE[1:], limit=cfg.limit, workspace=ws)
        log(f"data: {data_spec} ({data.train_size} training, {data.test_size} test examples, "
            f"fitted to {'x'.join(map(str, data.shape))})")

        # 1. the teacher, trained once and kept
        # keyed by what trained it, so a --quick teacher is never reused by a full run
        made_by = sha256_json({"data": data_spec, "limit": cfg.limit, "epochs": cfg.teacher_epochs, "seed": cfg.seed})[:12]
        weights = ws.path(f"demo/teacher-{made_by}.safetensors")
        t = time.perf_counter()
        if not weights.is_file():
            from ndc.zoo import demo_teacher

            log(f"training the teacher (ResNet-14, {cfg.teacher_epochs} epochs) ...")
            torch.manual_seed(cfg.seed)
            model = demo_teacher()
            train(model, data, TrainConfig(loss="ce", epochs=cfg.teacher_epochs, lr=0.1, batch_size=cfg.batch_size, seed=cfg.seed),
                  log=_epoch_log(log, "teacher"), device=cfg.device)
            ws.save_tensors(f"demo/teacher-{made_by}.safetensors", model.state_dict())
        times["teacher training"] = time.perf_counter() - t

        # 2. partition
        t = time.perf_counter()
        loaded = load_model("ndc.zoo:demo_teacher", weights=str(weights))
        plan, _ = partition_model(loaded, INPUT_SHAPE, by="residual")
        write_plan(ws, plan, loaded.model)
        times["partition"] = time.perf_counter() - t
        log(f"partition: {len(plan.trainable)} neighbourhoods to distil, {len(plan.neighbourhoods) - len(plan.trainable)} kept")

        # 3. distill every neighbourhood at the chosen width, in parallel
        # Only the teacher is reused from an earlier run: every timed stage is redone, so the times are real.
        t = time.perf_counter()
        distilled = stages.distill(ws, [Spec(width=cfg.width)], DistillConfig(data=data_spec, limit=cfg.limit, epochs=cfg.distill_epochs,
                                                                              batch_size=cfg.batch_size, seed=cfg.seed),
                                   workers=cfg.workers, device=cfg.device, force=True,
                                   on_done=lambda m: log(f"  distilled {m['neighbourhood']}: relative error "
                                                         f"{m.get('initial_error', float('nan')):.3f} -> {m.get('final_error', float('nan')):.3f}"))
        if distilled.failed:
            first = distilled.failed[0]
            raise NdcError(f"distillation of {first['neighbourhood']} failed: {first.get('error')}")
        times["distill"] = time.perf_counter() - t

        # 4. stitch, recalibrate batch norms, measure
        t = time.perf_counter()
        nd = stages.stitch(ws, None, width=cfg.width, data=data_spec, limit=cfg.limit, calibrate=20, device=cfg.device).summary
        times["stitch"] = time.perf_counter() - t

        # 5. fine-tune briefly by KD
        t = time.perf_counter()
        ft = stages.finetune(ws, TrainConfig(loss="kd", epochs=cfg.finetune_epochs, lr=stages.FINETUNE_LR, batch_size=cfg.batch_size,
                                             seed=cfg.seed, keep_initial=True),
                             data=data_spec, limit=cfg.limit, restart=True, device=cfg.device, on_epoch=_epoch_log(log, "fine-tune"))
        times["fine-tune"] = time.perf_counter() - t
        student = ft.model

        # 6. export ONNX, verified against PyTorch with onnxruntime
        t = time.perf_counter()
        onnx_path = ws.path("demo/student.onnx")
        export = export_model(student, onnx_path, INPUT_SHAPE, report_dir=ws.path("demo/export-failure"))
        teacher = load_teacher(ws)
        teacher_export = export_model(teacher.gm, ws.path("demo/teacher.onnx"), INPUT_SHAPE, report_dir=ws.path("demo/export-failure"))
        times["export + verify"] = time.perf_counter() - t

        # 7. the baseline: the same student from scratch by end-to-end KD, for the same wall time
        budget = times["distill"] + times["stitch"] + times["fine-tune"]
        log(f"baseline: the same student trained from scratch by KD for {budget:.0f}s ...")
        baseline = stages.kd(ws, TrainConfig(loss="kd", epochs=1000, lr=stages.SCRATCH_LR, batch_size=cfg.batch_size,
                                             time_budget=budget, seed=cfg.seed),
                             width=cfg.width, data=data_spec, limit=cfg.limit, restart=True, device=cfg.device,
                             on_epoch=_epoch_log(log, "KD baseline")).payload

    return {
        "data": data_spec,
        "train_examples": data.train_size,
        "test_examples": data.test_size,
        "width": cfg.width,
        "workers": cfg.workers,
        "device": cfg.device,
        "source": distilled.source,
        "teacher": {"accuracy": nd["teacher_accuracy"], "params": count_params(teacher.gm),
                    "flops": count_flops(teacher.gm, INPUT_SHAPE), "onnx_bytes": teacher_export["bytes"],
                    "latency_ms": teacher_export["latency_ms"]},
        "distilled": {"accuracy": nd["accuracy"], "agreement": nd.get("agreement")},
        "finetuned": {"accuracy": ft.payload["accuracy"], "params": count_params(student), "flops": count_flops(student, INPUT_SHAPE),
                      "onnx_bytes": export["bytes"], "latency_ms": export["latency_ms"], "max_abs_diff": export["max_abs_diff"],
                      "onnx": str(onnx_path)},
        "kd_baseline": {"accuracy": baseline["accuracy"], "seconds": baseline["seconds"], "epochs": baseline["epochs"]},
        "seconds": times,
        "nd_seconds": budget,
    }


def _epoch_log(log, what: str):
    def on(event: dict) -> None:
        if event.get("event", "epoch") == "epoch":
            log(f"  {what} epoch {event['epoch']}: accuracy {event['score']:.2%} ({event['seconds']:.0f}s)")
    return on
