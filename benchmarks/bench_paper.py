"""The paper's experiments on Fashion-MNIST with a ResNetV1-20 teacher, scaled to a 2-core CPU.

    python benchmarks/bench_paper.py sweep                 # learning rates, the same small sweep for every route
    python benchmarks/bench_paper.py table1 --widths 0.5   # Table 1 (one width per run) + time-to-accuracy
    python benchmarks/bench_paper.py table3a               # Table 3a: sparsity, ND without fine-tuning vs KD
    python benchmarks/bench_paper.py table3b               # Table 3b: data-free, Gaussian-noise ND vs noise KD
    python benchmarks/bench_paper.py table5                # Table 5: look-ahead (2-LA) before and after fine-tuning
    python benchmarks/bench_paper.py ndlr --lrs 0.001,0.003,0.01   # ND alone at several learning rates (defaults)

Teacher: ResNet-20 (option A) trained on all 60,000 training images
(benchmarks/common.py; cached); ``--teacher-examples 10000`` takes instead
the one bench_pareto.py trains on the first 10,000 images for 8 epochs (a
few minutes instead of half an hour; the JSON says which). Every route trains on the first
``--examples`` training images (default 10,000) and is measured on the full
10,000-image test set. End-to-end routes run in one process on 2 torch
threads; neighbourhood jobs run on 2 worker processes of 1 thread each: both
use the machine's 2 cores. Times count training only (per-epoch evaluation is
excluded) and, for ND, every stage: the activation cache, every job,
stitching and batch-norm recalibration, and fine-tuning.

Results go to benchmarks/results/paper-<table>.json; docs/benchmarks.md holds the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch

from common import DATA, RESULTS, log, open_data, small_teacher, small_teacher_name, teacher_info, workspace, write

from ndc.backends import make_backend
from ndc.errors import NdcError
from ndc.distill import DistillConfig, run_distill
from ndc.finetune import NoiseImages, TrainConfig, accuracy, train
from ndc.ir import Spec
from ndc.plan import load_teacher
from ndc.stitch import build_student, fresh_student, recalibrate_batchnorm, uniform_selection

CALIBRATION_BATCHES = 20
DEFAULT_LR = {"scratch": 0.1, "finetune": 0.01}


def teacher_name(teacher_examples: int | None) -> str:
    return small_teacher_name(teacher_examples) if teacher_examples else "resnet20-fmnist"


def setup(examples: int, name: str, teacher_examples: int | None = None):
    if teacher_examples:
        ws = workspace(f"{name}-{teacher_name(teacher_examples)}", weights=small_teacher(teacher_examples))
    else:
        ws = workspace(name)
    teacher = load_teacher(ws)
    data = open_data(DATA, (3, 32, 32), limit=examples, workspace=ws)
    return ws, teacher, data


def chosen_lr() -> dict:
    path = RESULTS / "paper-sweep.json"
    return json.loads(path.read_text())["chosen"] if path.is_file() else dict(DEFAULT_LR)


def nd(ws, teacher, data, spec: Spec, epochs: int, workers: int, examples: int, source: str = "cache", **extra) -> dict:
    """Distil every neighbourhood, stitch and recalibrate: returns the student, its accuracy and the time of each stage.

    The activation cache is deleted first, so every run pays its teacher pass.
    """
    shutil.rmtree(ws.path("cache"), ignore_errors=True)
    cfg = DistillConfig(data=DATA, limit=examples, source=source, epochs=epochs, batch_size=128, **extra)
    t = time.perf_counter()
    rows = run_distill(ws, [spec], cfg, make_backend("local", workers), teacher=teacher, force=True)
    distill_s = time.perf_counter() - t
    failed = [r for r in rows if r["status"] != "done"]
    assert not failed, failed
    t = time.perf_counter()
    selection = uniform_selection(teacher.plan, spec)
    student, _ = build_student(ws, teacher, selection)
    if source != "noise":
        recalibrate_batchnorm(student, data, CALIBRATION_BATCHES)
    stitch_s = time.perf_counter() - t
    return {"student": student, "distill_seconds": distill_s, "stitch_seconds": stitch_s,
            "seconds": distill_s + stitch_s, "accuracy": accuracy(student, data),
            "final_errors": {r["neighbourhood"]: r["final_error"] for r in rows}}


def time_to_kd(kd: dict, finetune_history: list[dict], nd: dict) -> dict:
    """Both routes' time to the KD baseline's final accuracy minus 0.5 points (ND counted from its first stage)."""
    target = kd["accuracy"] - 0.005
    kd_t = time_to(kd["history"], target)
    nd_t = time_to(finetune_history, target, offset=nd["seconds"], start_accuracy=nd["accuracy"])
    return {"target": target, "kd_seconds": kd_t, "nd_ft_seconds": nd_t, "speedup": (kd_t / nd_t) if kd_t and nd_t else None}


def time_to(history: list[dict], target: float, offset: float = 0.0, start_accuracy: float | None = None) -> float | None:
    """Seconds until the accuracy first reaches ``target`` (``offset`` added), or None if it never does."""
    if start_accuracy is not None and start_accuracy >= target:
        return offset
    for h in history:
        if h["accuracy"] >= target:
            return offset + h["seconds"]
    return None


# ------------------------------------------------------------------------ sweep


def sweep(args) -> None:
    """The same three-point learning-rate sweep for every route, on short runs at width 0.5."""
    ws, teacher, data = setup(args.examples, "bench-paper", args.teacher_examples)
    selection = uniform_selection(teacher.plan, Spec(width=0.5))
    results = {"ce": {}, "kd": {}, "finetune": {}}
    for lr in (0.03, 0.1, 0.3):
        for loss in ("ce", "kd"):
            r = train(fresh_student(teacher, selection), data, TrainConfig(loss=loss, epochs=args.sweep_epochs, lr=lr),
                      teacher=teacher.gm)
            results[loss][lr] = r["history"][-1]["accuracy"]
            log(f"sweep {loss} lr={lr}: {results[loss][lr]:.2%}")
    base = nd(ws, teacher, data, Spec(width=0.5), args.nd_epochs, args.workers, args.examples)
    state = {k: v.clone() for k, v in base["student"].state_dict().items()}
    for lr in (0.003, 0.01, 0.03):
        base["student"].load_state_dict(state)
        r = train(base["student"], data, TrainConfig(loss="kd", epochs=args.sweep_epochs, lr=lr), teacher=teacher.gm)
        results["finetune"][lr] = r["history"][-1]["accuracy"]
        log(f"sweep finetune lr={lr}: {results['finetune'][lr]:.2%}")
    best = {k: max(v, key=v.get) for k, v in results.items()}
    chosen = {"scratch": best["kd"], "scratch_ce": best["ce"], "finetune": best["finetune"]}
    write("paper-sweep.json", {"examples": args.examples, "epochs": args.sweep_epochs, "width": 0.5,
                               "results": {k: {str(lr): a for lr, a in v.items()} for k, v in results.items()},
                               "chosen": chosen})


# ---------------------------------------------------------------------- table 1


def table1(args) -> None:
    ws, teacher, data = setup(args.examples, "bench-paper", args.teacher_examples)
    lr = chosen_lr()
    teacher_acc = accuracy(teacher.gm, data)
    rows = []
    for k in args.widths:
        spec = Spec(width=k)
        selection = uniform_selection(teacher.plan, spec)
        row = {"width": k, "teacher_accuracy": teacher_acc}
        baselines = [("kd", lr["scratch"])] if args.no_ce else [("ce", lr.get("scratch_ce", lr["scratch"])), ("kd", lr["scratch"])]
        for loss, rate in baselines:
            model = fresh_student(teacher, selection)
            r = train(model, data, TrainConfig(loss=loss, epochs=args.epochs, lr=rate, compile=args.compile), teacher=teacher.gm,
                      log=lambda e, loss=loss: e.get("event") == "epoch" and log(f"k={k} {loss} epoch {e['epoch']}: {e['accuracy']:.2%}"))
            row[loss] = {"accuracy": r["history"][-1]["accuracy"], "best_accuracy": r["best_accuracy"],
                         "seconds": r["seconds"], "history": r["history"], "lr": rate}
        row["params"] = sum(p.numel() for p in model.parameters())
        out = nd(ws, teacher, data, spec, args.nd_epochs, args.workers, args.examples, compile=args.compile)
        log(f"k={k} ND: {out['accuracy']:.2%} in {out['seconds']:.0f}s")
        row["nd"] = {key: out[key] for key in ("accuracy", "seconds", "distill_seconds", "stitch_seconds", "final_errors")}
        r = train(out["student"], data, TrainConfig(loss="kd", epochs=args.ft_epochs, lr=lr["finetune"], compile=args.compile),
                  teacher=teacher.gm,
                  log=lambda e: e.get("event") == "epoch" and log(f"k={k} ND+FT epoch {e['epoch']}: {e['accuracy']:.2%}"))
        row["nd_ft"] = {"accuracy": r["history"][-1]["accuracy"], "best_accuracy": r["best_accuracy"],
                        "seconds": out["seconds"] + r["seconds"], "finetune_seconds": r["seconds"], "history": r["history"],
                        "lr": lr["finetune"]}
        row["time_to_accuracy"] = tta = time_to_kd(row["kd"], r["history"], out)
        log(f"k={k}: time to {tta['target']:.2%}: KD {tta['kd_seconds']}, ND+FT {tta['nd_ft_seconds']}")
        rows.append(row)
        write(f"paper-table1-{'-'.join(str(w) for w in args.widths)}{args.tag}.json",
              {"examples": args.examples, "epochs": args.epochs, "nd_epochs": args.nd_epochs, "ft_epochs": args.ft_epochs,
               "workers": args.workers, "compile": args.compile, "teacher": teacher_info(teacher_name(args.teacher_examples)),
               "rows": rows})


# --------------------------------------------------------------------- table 3a


def table3a(args) -> None:
    from ndc.passes.rewrite import Pruner
    from ndc.stitch import stitch

    ws, teacher, data = setup(args.examples, "bench-paper", args.teacher_examples)
    lr = chosen_lr()
    rows = []
    for s in args.sparsities:
        spec = Spec(sparsity=s)
        out = nd(ws, teacher, data, spec, args.nd_epochs, args.workers, args.examples)
        # KD baseline: the teacher's weights pruned gradually to the same sparsity while training end to end by KD
        model = stitch(teacher, {}).requires_grad_(True).train()
        names = {nb.name for nb in teacher.plan.trainable}
        pruned = _prunable(model, teacher.plan, names)
        pruner = Pruner(pruned, s)
        r = train(model, data, TrainConfig(loss="kd", epochs=args.epochs, lr=lr["finetune"]), teacher=teacher.gm,
                  pruner=pruner, sparsity=s)
        row = {"sparsity": s, "nd": {"accuracy": out["accuracy"], "seconds": out["seconds"]},
               "kd": {"accuracy": r["history"][-1]["accuracy"], "best_accuracy": r["best_accuracy"], "seconds": r["seconds"],
                      "achieved": pruner.sparsity()}}
        log(f"sparsity {s}: ND {out['accuracy']:.2%} ({out['seconds']:.0f}s), KD {row['kd']['accuracy']:.2%} ({r['seconds']:.0f}s)")
        rows.append(row)
        write("paper-table3a.json", {"examples": args.examples, "epochs": args.epochs, "nd_epochs": args.nd_epochs,
                                     "workers": args.workers, "teacher": teacher_info(teacher_name(args.teacher_examples)),
                                     "teacher_accuracy": accuracy(teacher.gm, data), "rows": rows})


def _prunable(model, plan, names):
    """A view of the stitched model holding only the distilled neighbourhoods' modules (what ND prunes)."""
    import torch.nn as nn

    holder = nn.Module()
    prefixes = [m for nb in plan.neighbourhoods if nb.name in names for m in nb.modules]
    for i, name in enumerate(sorted(set(prefixes))):
        holder.add_module(f"m{i}", model.get_submodule(name))
    return holder


# --------------------------------------------------------------------- table 3b


def table3b(args) -> None:
    ws, teacher, data = setup(args.examples, "bench-paper", args.teacher_examples)
    lr = chosen_lr()
    noise = NoiseImages((3, 32, 32), args.examples, data)
    rows = []
    for k in args.widths:
        spec = Spec(width=k)
        selection = uniform_selection(teacher.plan, spec)
        row = {"width": k}
        for kind in ("gaussian", "matched"):
            extra = {"noise": kind}
            out = nd(ws, teacher, data, spec, args.nd_epochs, args.workers, args.examples, source="noise", **extra)
            row[f"g_nd_{kind}"] = {"accuracy": out["accuracy"], "seconds": out["seconds"], "final_errors": out["final_errors"]}
            log(f"k={k} G-ND ({kind}): {out['accuracy']:.2%}")
            if kind == "gaussian":
                # Noise through frozen batch norms is not renormalised: a tenth of the usual rate keeps it stable.
                rate = lr["finetune"] / 10
                try:
                    r = train(out["student"], noise, TrainConfig(loss="kd", epochs=args.ft_epochs, lr=rate, lam=0.0,
                                                                 augment=False, freeze_bn=True), teacher=teacher.gm)
                    row["g_nd_ft"] = {"accuracy": r["history"][-1]["accuracy"], "best_accuracy": r["best_accuracy"],
                                      "seconds": out["seconds"] + r["seconds"], "lr": rate}
                except NdcError as e:  # diverged: recorded, not hidden
                    row["g_nd_ft"] = {"accuracy": None, "error": str(e), "lr": rate}
                log(f"k={k} G-ND+FT: {row['g_nd_ft']}")
        r = train(fresh_student(teacher, selection), noise, TrainConfig(loss="kd", epochs=args.epochs, lr=lr["scratch"], lam=0.0,
                                                                         augment=False), teacher=teacher.gm)
        row["gn_kd"] = {"accuracy": r["history"][-1]["accuracy"], "best_accuracy": r["best_accuracy"], "seconds": r["seconds"]}
        log(f"k={k} GN-KD: {row['gn_kd']['accuracy']:.2%}")
        rows.append(row)
        write("paper-table3b.json", {"examples": args.examples, "epochs": args.epochs, "nd_epochs": args.nd_epochs,
                                     "ft_epochs": args.ft_epochs, "teacher": teacher_info(teacher_name(args.teacher_examples)),
                                     "teacher_accuracy": accuracy(teacher.gm, data), "rows": rows})


# ---------------------------------------------------------------------- table 5


def table5(args) -> None:
    """Look-ahead (eq. 5): every job also matches the teacher two neighbourhoods further on, before and after FT."""
    ws, teacher, data = setup(args.examples, "bench-paper", args.teacher_examples)
    lr = chosen_lr()
    name = teacher_name(args.teacher_examples)
    rows = []
    for k in args.widths:
        for lookahead in (0, 2):
            out = nd(ws, teacher, data, Spec(width=k), args.nd_epochs, args.workers, args.examples, lookahead=lookahead)
            r = train(out["student"], data, TrainConfig(loss="kd", epochs=args.ft_epochs, lr=lr["finetune"]),
                      teacher=teacher.gm)
            row = {"width": k, "lookahead": lookahead, "nd": out["accuracy"], "nd_seconds": out["seconds"],
                   "nd_ft": r["history"][-1]["accuracy"], "ft_seconds": r["seconds"],
                   "ft_history": [e["accuracy"] for e in r["history"]], "final_errors": out["final_errors"]}
            log(f"k={k} look-ahead {lookahead}: ND {row['nd']:.2%} ({row['nd_seconds']:.0f}s), "
                f"ND+FT {row['nd_ft']:.2%} ({row['ft_seconds']:.0f}s)")
            rows.append(row)
            write(f"paper-table5{args.tag}.json",
                  {"examples": args.examples, "nd_epochs": args.nd_epochs, "ft_epochs": args.ft_epochs,
                   "workers": args.workers, "teacher": {"name": name, **teacher_info(name)},
                   "teacher_accuracy": accuracy(teacher.gm, data), "rows": rows})


def ndlr(args) -> None:
    """ND alone (no fine-tuning) at each ``--lrs`` learning rate, the same jobs otherwise: which default to ship."""
    ws, teacher, data = setup(args.examples, "bench-paper", args.teacher_examples)
    name = teacher_name(args.teacher_examples)
    rows = []
    for k in args.widths:
        for lr in args.lrs:
            out = nd(ws, teacher, data, Spec(width=k), args.nd_epochs, args.workers, args.examples, lr=lr)
            rows.append({"width": k, "lr": lr, "accuracy": out["accuracy"], "seconds": out["seconds"],
                         "final_errors": out["final_errors"]})
            log(f"k={k} lr={lr}: ND {out['accuracy']:.2%} ({out['seconds']:.0f}s)")
            write(f"paper-ndlr{args.tag}.json", {"examples": args.examples, "nd_epochs": args.nd_epochs, "workers": args.workers,
                                                 "teacher": {"name": name, **teacher_info(name)}, "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("table", choices=["sweep", "table1", "table3a", "table3b", "table5", "ndlr"])
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--widths", type=lambda t: [float(v) for v in t.split(",")], default=[1.0, 0.75, 0.5])
    ap.add_argument("--sparsities", type=lambda t: [float(v) for v in t.split(",")], default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--epochs", type=int, default=12, help="end-to-end epochs (CE, KD)")
    ap.add_argument("--nd-epochs", type=int, default=8, help="epochs of every neighbourhood job")
    ap.add_argument("--ft-epochs", type=int, default=6, help="fine-tuning epochs")
    ap.add_argument("--sweep-epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lrs", type=lambda t: [float(v) for v in t.split(",")], default=[0.001, 0.003, 0.01],
                    help="ndlr: ND learning rates")
    ap.add_argument("--teacher-examples", type=int, default=None,
                    help="the ResNet-20 teacher trained on the first N images (8 epochs) instead of all 60,000")
    ap.add_argument("--no-ce", action="store_true", help="table1: skip the cross-entropy baseline (time to KD needs only KD)")
    ap.add_argument("--compile", default="none", help="table1: torch.compile mode of every route (CE, KD, ND, fine-tuning)")
    ap.add_argument("--tag", default="", help="suffix of the result file's name (e.g. -e30 for a longer baseline)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    {"sweep": sweep, "table1": table1, "table3a": table3a, "table3b": table3b, "table5": table5, "ndlr": ndlr}[args.table](args)


if __name__ == "__main__":
    main()
