"""How long the full Fashion-MNIST training set takes to load and to go through once.

    python benchmarks/bench_data.py [--repeats 5] [--out benchmarks/results/data.json]

Reads Debian's dataset-fashion-mnist (real data; exits if it is absent), fits
it to a CIFAR-style teacher input (3x32x32: zero-pad 2 px, repeat the grey
channel) and normalises with training statistics, as every ndc stage does.
Measured on one torch thread, the setting of ndc's tests and workers:

* ``open (cold)``: parse the gzipped IDX files and compute the training
  statistics (no workspace, so nothing is cached);
* ``open (cached)``: the same with statistics already in a workspace;
* ``open (cold) + one pass``: the two together, the figure a user waits for;
* ``pass``: one pass over the 60000 training images in batches of 256;
* ``pass, shuffle + augment``: the same, shuffled, with random translation
  by up to 4 px and horizontal flips;
* ``per-item DataLoader``: the same pass as a torch ``Dataset`` whose
  ``__getitem__`` fits and normalises one image at a time, batched by a
  ``DataLoader`` (the usual torchvision-style pipeline), for comparison.

Every figure is repeated; the table gives the median and the min-max. Raw
results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ndc.data import FASHION_MNIST_DIR, open_data
from ndc.workspace import Workspace

SHAPE = (3, 32, 32)
BATCH = 256


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def one_pass(data, **kwargs) -> int:
    n = 0
    for _, y in data.batches("train", BATCH, **kwargs):
        n += len(y)
    assert n == data.train_size
    return n


class PerItem(torch.utils.data.Dataset):
    """The per-example pipeline ndc avoids: one image fitted and normalised per __getitem__."""

    def __init__(self, images, labels, mean: float, std: float):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).float().div(255)
        x = torch.nn.functional.pad(x[None], (2, 2, 2, 2)).expand(3, -1, -1)
        return (x - self.mean) / self.std, int(self.labels[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/data.json")
    args = parser.parse_args()
    if not FASHION_MNIST_DIR.is_dir():
        sys.exit(f"{FASHION_MNIST_DIR} absent: apt-get install dataset-fashion-mnist")
    torch.set_num_threads(1)

    results: dict[str, list[float]] = {}
    results["open (cold): parse IDX + statistics"] = timed(lambda: open_data("fashion-mnist", SHAPE), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        open_data("fashion-mnist", SHAPE, workspace=ws)
        results["open (cached statistics)"] = timed(lambda: open_data("fashion-mnist", SHAPE, workspace=ws),
                                                    args.repeats)
    results["open (cold) + one pass: the headline"] = timed(lambda: one_pass(open_data("fashion-mnist", SHAPE)),
                                                            args.repeats)
    data = open_data("fashion-mnist", SHAPE)
    results[f"pass over 60000, batches of {BATCH}"] = timed(lambda: one_pass(data), args.repeats)
    epochs = iter(range(10**6))
    results["pass, shuffle + augment + flip"] = timed(
        lambda: one_pass(data, shuffle=True, augment=True, flip=True, epoch=next(epochs)), args.repeats)
    split = data._splits["train"]  # the raw uint8 images, to give the per-item pipeline the same input
    per_item = PerItem(split.x, split.y, data.mean[0], data.std[0])
    loader = torch.utils.data.DataLoader(per_item, batch_size=BATCH, shuffle=False)
    results["per-item Dataset + DataLoader (reference)"] = timed(lambda: sum(len(y) for _, y in loader),
                                                                 max(1, min(args.repeats, 3)))

    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    rows = []
    for name, times in results.items():
        rows.append({"step": name, "median_s": statistics.median(times), "min_s": min(times),
                     "max_s": max(times), "runs": times})
    payload = {"command": "python benchmarks/bench_data.py " + " ".join(sys.argv[1:]),
               "data": "fashion-mnist (Debian dataset-fashion-mnist, 60000 train)", "shape": list(SHAPE),
               "batch": BATCH, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": machine, "cpus": _cpus(), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")

    print("| step | median s | min-max s |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} |")
    print(f"\nraw results: {args.out}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
