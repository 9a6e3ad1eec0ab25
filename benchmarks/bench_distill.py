"""One epoch of neighbourhood distillation against one epoch of end-to-end KD, side by side.

    python benchmarks/bench_distill.py --examples 10000 --repeats 3
    python benchmarks/bench_distill.py --epochs 8 --repeats 3 --routes "ND, cache"   # 1 vs 2 workers over a longer run

Teacher: ResNet-20 trained on Fashion-MNIST (benchmarks/common.py, cached).
Student: every residual block at width 0.5. For each repeat, in one run:

* ND, activation cache, 1 worker and 2 workers: building the cache (one
  teacher pass over the examples) plus one epoch of every neighbourhood job;
* ND, recompute, 1 worker and 2 workers: one epoch of every job, each running
  the teacher's prefix on every batch;
* ND fused (``--engine fused``), cache and recompute, 1 and 2 processes: every
  candidate of a process trained in one loop (recompute: one teacher forward
  per batch serves every block);
* end-to-end KD of the same student for one epoch over the same examples, in
  one process with 1 and with 2 torch threads;
* "compiled" routes: the same through ``torch.compile`` (``--compile
  default``); compilation is part of their time (PyTorch caches it on disk, so
  the first repeat compiles and later ones mostly load).

``--epochs N`` runs every route for N epochs instead (the cache is still
built once per run), and ``--routes`` keeps only some routes.

Every ND job runs on one torch thread (parallelism comes from processes).
Evaluation is excluded from every timing (ND jobs evaluate once at the end of
their last epoch on 64 held-out examples; KD on one batch per epoch).
Writes benchmarks/results/distill.json (distill-eN.json with --epochs N).
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch

from common import CACHE, DATA, log, median, open_data, spread, teacher_info, workspace, write

from ndc.backends import make_backend
from ndc.distill import DistillConfig, run_distill
from ndc.finetune import TrainConfig, train
from ndc.ir import Spec
from ndc.plan import load_teacher
from ndc.stitch import fresh_student, uniform_selection


def nd_epoch(source: str, workers: int, examples: int, epochs: int = 1, engine: str = "jobs", compile: str = "none") -> dict:
    ws = workspace("bench-distill")
    for sub in ("jobs", "cache"):
        shutil.rmtree(ws.path(sub), ignore_errors=True)
    cfg = DistillConfig(data=DATA, limit=examples, source=source, epochs=epochs, batch_size=128, val_size=64, evals=1,
                        engine=engine, compile=compile)
    teacher = load_teacher(ws)
    cache_done = []
    t = time.perf_counter()
    rows = run_distill(ws, [Spec(width=0.5)], cfg, make_backend("local", workers), teacher=teacher, force=True,
                       on_progress=lambda u: u.get("event") == "teacher" and cache_done.append(time.perf_counter()))
    total = time.perf_counter() - t
    assert all(r["status"] == "done" for r in rows), rows
    return {"seconds": total, "cache_seconds": (cache_done[-1] - t) if cache_done else 0.0,
            "job_seconds": sum(r["seconds"] for r in rows), "jobs": len(rows),
            "final_error": median([r["final_error"] for r in rows])}


def kd_epoch(threads: int, examples: int, epochs: int = 1, compile: str = "none") -> dict:
    ws = workspace("bench-distill")
    teacher = load_teacher(ws)
    data = open_data(DATA, (3, 32, 32), limit=examples, workspace=ws)
    student = fresh_student(teacher, uniform_selection(teacher.plan, Spec(width=0.5)))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        train(student, data, TrainConfig(loss="kd", epochs=epochs, lr=0.1, batch_size=128, eval_batches=1, compile=compile), teacher=teacher.gm)
        return {"seconds": time.perf_counter() - t}
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=10_000, help="training examples per epoch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of every route (ND jobs and KD)")
    ap.add_argument("--out", default=None, help="results file name [default: distill.json, distill-eN.json with --epochs N]")
    ap.add_argument("--routes", default=None, help="only the routes whose names contain one of these |-separated parts "
                    "(KD on 2 threads, the reference, always runs)")
    args = ap.parse_args()
    routes = {
        "ND, cache, 1 worker": lambda: nd_epoch("cache", 1, args.examples, args.epochs),
        "ND, cache, 2 workers": lambda: nd_epoch("cache", 2, args.examples, args.epochs),
        "ND, recompute, 1 worker": lambda: nd_epoch("recompute", 1, args.examples, args.epochs),
        "ND, recompute, 2 workers": lambda: nd_epoch("recompute", 2, args.examples, args.epochs),
        "ND fused, cache, 1 process": lambda: nd_epoch("cache", 1, args.examples, args.epochs, "fused"),
        "ND fused, cache, 2 processes": lambda: nd_epoch("cache", 2, args.examples, args.epochs, "fused"),
        "ND fused, recompute, 1 process": lambda: nd_epoch("recompute", 1, args.examples, args.epochs, "fused"),
        "ND fused, recompute, 2 processes": lambda: nd_epoch("recompute", 2, args.examples, args.epochs, "fused"),
        "ND compiled, cache, 2 workers": lambda: nd_epoch("cache", 2, args.examples, args.epochs, "jobs", "default"),
        "ND fused compiled, cache, 1 process": lambda: nd_epoch("cache", 1, args.examples, args.epochs, "fused", "default"),
        "ND fused compiled, cache, 2 processes": lambda: nd_epoch("cache", 2, args.examples, args.epochs, "fused", "default"),
        "KD compiled, 2 threads": lambda: kd_epoch(2, args.examples, args.epochs, "default"),
        "KD, 1 thread": lambda: kd_epoch(1, args.examples, args.epochs),
        "KD, 2 threads": lambda: kd_epoch(2, args.examples, args.epochs),
    }
    if args.routes:
        routes = {name: run for name, run in routes.items() 
                  if name == "KD, 2 threads" or any(part in name for part in args.routes.split("|"))}
    results: dict[str, list[dict]] = {name: [] for name in routes}
    for r in range(args.repeats):
        for name, run in routes.items():  # interleaved: every repeat runs every route once
            out = run()
            results[name].append(out)
            log(f"repeat {r + 1}: {name}: {out['seconds']:.1f}s")
    kd = median([x["seconds"] for x in results["KD, 2 threads"]])
    print(f"\n{'route':<40} {'seconds (median, min-max)':>27} {'vs KD 2 threads':>16} {'teacher pass':>13}")
    rows = []
    for name, outs in results.items():
        secs = [x["seconds"] for x in outs]
        cache = [x.get("cache_seconds", 0.0) for x in outs]
        row = {"route": name, "seconds": secs, "median": median(secs), "ratio_to_kd_2_threads": median(secs) / kd,
               "cache_seconds": cache, "details": outs}
        rows.append(row)
        print(f"{name:<40} {spread(secs):>27} {median(secs) / kd:>15.2f}x {median(cache):>12.1f}s")
    write(args.out or ("distill.json" if args.epochs == 1 else f"distill-e{args.epochs}.json"),
          {"examples": args.examples, "repeats": args.repeats, "epochs": args.epochs, "teacher": teacher_info(), "rows": rows,
           "cache_dir": str(CACHE)})


if __name__ == "__main__":
    main()
