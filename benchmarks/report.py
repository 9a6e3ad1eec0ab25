"""Render benchmarks/results/*.json as the markdown tables of docs/benchmarks.md.

    python benchmarks/report.py            # prints every table it has results for
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(os.environ.get("NDC_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def secs(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0f}"


def distill() -> None:
    for path in sorted(RESULTS.glob("distill*.json")):
        d = json.loads(path.read_text())
        epochs = d.get("epochs", 1)
        print(f"\n### {'One epoch' if epochs == 1 else f'{epochs} epochs'} over {d['examples']} images, {d['repeats']} repeats\n")
        print("| route | seconds, median (min–max) | × KD (2 threads) | of which teacher pass |")
        print("|---|---:|---:|---:|")
        for r in d["rows"]:
            s = r["seconds"]
            cache = sorted(r["cache_seconds"])[len(r["cache_seconds"]) // 2]
            print(f"| {r['route']} | {r['median']:.1f} ({min(s):.1f}–{max(s):.1f}) | {r['ratio_to_kd_2_threads']:.2f} | "
                  f"{f'{cache:.1f}' if cache else '–'} |")


def table1() -> None:
    rows = []
    for path in sorted(RESULTS.glob("paper-table1-*.json")):
        d = json.loads(path.read_text())
        for r in d["rows"]:
            rows.append((path.stem, d, r))
    if not rows:
        return
    print("\n### Table 1\n")
    print("| run | k | params | CE | KD | ND | ND + FT | CE s | KD s | ND s | ND + FT s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, d, r in rows:
        ce = r.get("ce")  # absent with bench_paper.py table1 --no-ce
        ce_acc, ce_s = (pct(ce["accuracy"]), f"{ce['seconds']:.0f}") if ce else ("–", "–")
        print(f"| {name.removeprefix('paper-table1-')} (e2e {d['epochs']} ep, ND {d['nd_epochs']} ep, FT {d['ft_epochs']} ep) | "
              f"{r['width']} | {r['params'] / 1000:.0f}K | {ce_acc} | {pct(r['kd']['accuracy'])} | "
              f"{pct(r['nd']['accuracy'])} | {pct(r['nd_ft']['accuracy'])} | {ce_s} | "
              f"{r['kd']['seconds']:.0f} | {r['nd']['seconds']:.0f} | {r['nd_ft']['seconds']:.0f} |")
    print("\n### Time to KD's final accuracy minus 0.5 points\n")
    print("| run | k | target | KD s | ND + FT s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, d, r in rows:
        t = r["time_to_accuracy"]
        speed = f"{t['speedup']:.2f}×" if t["speedup"] else "–"
        print(f"| {name.removeprefix('paper-table1-')} | {r['width']} | {pct(t['target'])} | {secs(t['kd_seconds'])} | "
              f"{secs(t['nd_ft_seconds'])} | {speed} |")


def table3a() -> None:
    d = load("paper-table3a.json")
    if not d:
        return
    print(f"\n### Table 3a (teacher {pct(d['teacher_accuracy'])})\n")
    print("| sparsity | ND (no fine-tuning) | KD | ND s | KD s | KD s / ND s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in d["rows"]:
        print(f"| {r['sparsity']} | {pct(r['nd']['accuracy'])} | {pct(r['kd']['accuracy'])} | {r['nd']['seconds']:.0f} | "
              f"{r['kd']['seconds']:.0f} | {r['kd']['seconds'] / r['nd']['seconds']:.2f} |")


def table3b() -> None:
    d = load("paper-table3b.json")
    if not d:
        return
    print(f"\n### Table 3b (teacher {pct(d['teacher_accuracy'])})\n")
    print("| k | G-ND, N(0,1) | G-ND, matched moments | G-ND + FT (noise) | GN-KD |")
    print("|---:|---:|---:|---:|---:|")
    for r in d["rows"]:
        print(f"| {r['width']} | {pct(r['g_nd_gaussian']['accuracy'])} | {pct(r['g_nd_matched']['accuracy'])} | "
              f"{pct(r['g_nd_ft']['accuracy']) if r['g_nd_ft']['accuracy'] is not None else 'diverged'} | "
              f"{pct(r['gn_kd']['accuracy'])} |")


def sweep() -> None:
    d = load("paper-sweep.json")
    if not d:
        return
    print(f"\n### Learning-rate sweep ({d['epochs']} epochs, k = {d['width']})\n")
    print("| route | learning rates | accuracy at each | chosen |")
    print("|---|---|---|---:|")
    names = {"ce": ("CE from scratch", "scratch_ce"), "kd": ("KD from scratch", "scratch"), "finetune": ("ND + FT", "finetune")}
    for key, (label, chosen) in names.items():
        lrs = " / ".join(d["results"][key])
        cells = " / ".join(pct(a) for a in d["results"][key].values())
        print(f"| {label} | {lrs} | {cells} | {d['chosen'][chosen]} |")


if __name__ == "__main__":
    for part in (distill, sweep, table1, table3a, table3b):
        part()
