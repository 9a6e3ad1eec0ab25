"""ND (fused engine) + fine-tuning against end-to-end KD, on one device, in one run: the GPU headline.

    python benchmarks/bench_gpu.py --device cuda                       # the measurement (an H100 or H200)
    python benchmarks/bench_gpu.py --device cpu --examples 512 --teacher-epochs 1 --nd-epochs 1 \\
        --finetune-epochs 2 --kd-epochs 2 --data digits                # a quick check that it runs

Every route runs on the same device, on the same student (the ResNet-20
teacher's nine residual blocks at width 0.5), the same data and the same
preprocessing, as a user runs them through ``ndc.stages``:

* **teacher**: ResNet-20 trained by cross entropy (cached beside the results;
  not timed);
* **ND**: ``distill`` with the fused engine (the activation cache's teacher
  pass, every neighbourhood, every candidate published), ``stitch`` with
  batch-norm recalibration, then ``finetune`` epoch by epoch; every stage is
  counted;
* **KD**: ``kd`` from scratch for ``--kd-epochs`` epochs (30), the baseline.

The target is KD's final accuracy − 0.5 points. ``kd_seconds_to_target`` is
KD's training time (evaluation excluded, as ``ndc kd`` logs it) when it first
reached the target; ``nd_seconds_to_target`` is distil + stitch + the
fine-tuning time when ND first reached it (0 fine-tuning epochs if the
stitched student already does; stitch counts building, recalibrating and
saving the student, not its evaluation, as KD's time counts no evaluation).
Epoch times: one fused ND epoch (the training loop's rate between its first
and last progress reports: steps per epoch x seconds per step, held-out
evaluations included, setup and the teacher pass not) and the median KD
epoch. Writes benchmarks/results/gpu.json (``--out`` to change), atomically,
after KD, after ND and after each mode: a run cut short or a route that fails
keeps what was measured (a failure is recorded with its traceback and the next
mode still runs).

``--compile`` (default ``none,reduce-overhead``) runs both routes again for
each further ``torch.compile`` mode, KD and ND alike (a baseline as good as
ours), under ``by_compile``; the top-level figures are the first mode's. The
compiled rows' times include compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import traceback

import torch

from common import CACHE, RESULTS, log, machine

from ndc import stages
from ndc.data import open_data
from ndc.devicedata import synchronize
from ndc.distill import DistillConfig
from ndc.finetune import TrainConfig, train
from ndc.ir import Spec
from ndc.load import load_model
from ndc.plan import partition_model, write_plan
from ndc.workspace import Workspace

INPUT_SHAPE = (1, 3, 32, 32)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def teacher(args) -> str:
    """The ResNet-20 teacher's weights, trained on ``args.device`` once per (data, examples, epochs)."""
    from safetensors.torch import save_file

    from ndc.zoo import resnet20

    path = CACHE / f"gpu-teacher-{args.data.replace(':', '_').replace('/', '_')}-{args.examples}-{args.teacher_epochs}.safetensors"
    if path.is_file():
        return str(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = open_data(args.data, INPUT_SHAPE[1:], limit=args.teacher_examples)
    model = resnet20()
    log(f"training the teacher on {data.train_size} images for {args.teacher_epochs} epochs on {args.device}")
    result = train(model, data, TrainConfig(loss="ce", epochs=args.teacher_epochs, lr=0.1, batch_size=128), device=args.device)
    log(f"teacher: {result['best_accuracy']:.2%} in {result['seconds']:.0f}s")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def first_reaching(history: list[dict], target: float) -> dict | None:
    return next((h for h in history if h["accuracy"] >= target), None)


def routes(args, ws: Workspace, compile_mode: str, run: dict, save) -> None:
    """KD from scratch, then ND (fused distil, stitch, fine-tuning), both through ``torch.compile`` in ``compile_mode``;
    ``run`` is filled as they finish (``save()`` writes it out)."""
    data_args = {"data": args.data, "limit": args.examples}
    spec = Spec(width=args.width)

    # ---- KD from scratch: the baseline (first, so the device is as warm for ND as for KD)
    log(f"KD from scratch, {args.kd_epochs} epochs on {args.device}, --compile {compile_mode}")
    kd = stages.kd(ws, TrainConfig(loss="kd", epochs=args.kd_epochs, lr=stages.SCRATCH_LR, compile=compile_mode), width=args.width,
                   restart=True, device=args.device, log=log, **data_args).payload
    target = kd["accuracy"] - 0.005
    reached = first_reaching(kd["history"], target)
    kd_seconds = reached["seconds"]
    kd_epochs = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + kd["history"], kd["history"])]
    run.update({"kd_final_accuracy": kd["accuracy"], "target_accuracy": target, "kd_seconds_to_target": kd_seconds,
                "kd_epochs_to_target": reached["epoch"], "kd_epoch_seconds": statistics.median(kd_epochs),
                "kd_first_epoch_seconds": kd_epochs[0], "kd": {"history": kd["history"], "params": kd["params"]}})
    save()

    # ---- ND: fused distillation (cache included), stitch + recalibration, fine-tuning; every stage timed
    log(f"ND: fused distillation, {args.nd_epochs} epochs, --compile {compile_mode}")
    shutil.rmtree(ws.path("cache"), ignore_errors=True)  # every ND run pays its teacher pass
    synchronize(args.device)
    t = time.perf_counter()
    cache_done: list[float] = []
    steps: list[tuple[float, int, int]] = []  # (time, loop step, planned steps) at each progress report

    def progress(u: dict) -> None:
        if u.get("event") == "teacher" and u["step"] == u["total"]:
            cache_done.append(time.perf_counter())  # the last: arrays written and hashed
        elif u.get("event") == "advance":
            steps.append((time.perf_counter(), u["step"], u["total"]))

    distilled = stages.distill(ws, [spec], DistillConfig(epochs=args.nd_epochs, compile=compile_mode, **data_args), source="cache",
                               engine="fused", device=args.device, force=True, on_progress=progress)
    synchronize(args.device)
    distill_seconds = time.perf_counter() - t
    assert not distilled.failed, distilled.failed
    cache_seconds = cache_done[-1] - t if cache_done else 0.0
    if len(steps) >= 2 and steps[-1][1] > steps[0][1]:  # the loop's rate, from its first report to its last
        nd_epoch = (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1]) * steps[-1][2] / args.nd_epochs
    else:
        nd_epoch = (distill_seconds - cache_seconds) / args.nd_epochs
    run.update({"nd_epoch_seconds": nd_epoch, "nd_epoch_over_kd_epoch": nd_epoch / run["kd_epoch_seconds"],
                "nd": {"distill_seconds": distill_seconds, "cache_seconds": cache_seconds,
                       "epoch_seconds_with_setup": (distill_seconds - cache_seconds) / args.nd_epochs,
                       "engine": distilled.engine, "final_errors": [r.get("final_error") for r in distilled.rows]}})
    save()
    stitched = stages.stitch(ws, None, width=args.width, calibrate=20, device=args.device, **data_args).summary
    stitch_seconds = stitched["seconds"]["stitch"]  # built, recalibrated, saved; its evaluation is not counted
    log(f"ND: distil {distill_seconds:.1f}s (teacher pass {cache_seconds:.1f}s), stitch {stitch_seconds:.1f}s, "
        f"stitched student {stitched['accuracy']:.2%}; KD target {target:.2%}")
    finetune = stages.finetune(ws, TrainConfig(loss="kd", epochs=args.finetune_epochs, lr=stages.FINETUNE_LR, keep_initial=True,
                                               compile=compile_mode),
                               restart=True, device=args.device, log=log, **data_args).payload
    nd_seconds = None
    if stitched["accuracy"] >= target:
        nd_seconds, ft_epochs = distill_seconds + stitch_seconds, 0
    else:
        hit = first_reaching(finetune["history"], target)
        if hit is not None:
            nd_seconds, ft_epochs = distill_seconds + stitch_seconds + hit["seconds"], hit["epoch"]
    run["teacher_accuracy"] = stitched["teacher_accuracy"]
    run["nd"].update({"stitch_seconds": stitch_seconds, "stitch_evaluate_seconds": stitched["seconds"].get("evaluate"),
                      "stitched_accuracy": stitched["accuracy"], "finetuned_accuracy": finetune["accuracy"],
                      "finetune_history": finetune["history"]})
    run.update({"nd_seconds_to_target": nd_seconds,
                "nd_finetune_epochs_to_target": ft_epochs if nd_seconds is not None else None,
                "speedup": run["kd_seconds_to_target"] / nd_seconds if nd_seconds else None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", default="fashion-mnist", help="data spec (on a lent GPU: fashion-mnist:DIR with the IDX files)")
    ap.add_argument("--examples", type=int, default=10_000, help="training examples of ND, fine-tuning and KD")
    ap.add_argument("--teacher-examples", type=int, default=None, help="training examples of the teacher [default: all]")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--nd-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--kd-epochs", type=int, default=30)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--compile", default="none,reduce-overhead",
                    help="torch.compile modes to run both routes in, in order; the first is the headline")
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)

    ws = Workspace(CACHE / "bench-gpu")
    with ws.writing("bench_gpu", create=True):
        loaded = load_model("ndc.zoo:resnet20", weights=teacher(args))
        plan, _ = partition_model(loaded, INPUT_SHAPE, by="residual")
        write_plan(ws, plan, loaded.model)
    result: dict = {"device": device_name(args.device), "machine": machine(), "settings": vars(args), "by_compile": {}}

    def save() -> None:  # atomically, after every part: a run cut short keeps what it measured
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.out)

    headline = None
    for mode in args.compile.split(","):
        run = result["by_compile"][mode] = {"compile": mode}
        try:
            routes(args, ws, mode, run, save)
        except Exception as e:  # a mode failing must not lose what was measured (one GPU run is all there is)
            log(f"--compile {mode} failed: {type(e).__name__}: {e}")
            run.update({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        else:
            if headline is None:  # the top-level figures: the first mode that completed
                headline = mode
                result.update({key: value for key, value in run.items() if key != "compile"}, headline_compile=mode)
            speedup = f"{run['speedup']:.2f}x" if run["speedup"] else "never reached the target"
            nd = run["nd_seconds_to_target"]
            print(f"\n{result['device']}, --compile {mode}: ND epoch {run['nd_epoch_seconds']:.2f}s vs KD epoch "
                  f"{run['kd_epoch_seconds']:.2f}s ({run['nd_epoch_over_kd_epoch']:.2f}x); to KD's final - 0.5 pt "
                  f"({run['target_accuracy']:.2%}): KD {run['kd_seconds_to_target']:.1f}s, "
                  f"ND {nd if nd is None else round(nd, 1)}s -> {speedup}", flush=True)
        save()
        log(f"wrote {args.out}")
    if headline is None:
        raise SystemExit(f"every mode failed; {args.out} has the tracebacks")


if __name__ == "__main__":
    main()
