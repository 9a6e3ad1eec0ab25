"""A transformer on real data: a Hugging Face ViT on Fashion-MNIST, ND (+FT) against end-to-end KD.

    python benchmarks/bench_transformer.py                       # teacher (once, cached), then every route at width 0.5
    python benchmarks/bench_transformer.py --examples 10000 --epochs 8 --nd-epochs 4 --ft-epochs 4

Teacher: ``examples/transformers_models.py:fashion_vit`` (ViTForImageClassification:
1x28x28 images in 7x7 patches, 4 layers, hidden 64, 4 heads, MLP 128), traced
by the torch.export frontend and trained by cross entropy on all 60,000
training images (cached in benchmarks/results/cache/). The student is every
attention and MLP block at width 0.5 (2 of 4 heads, MLP 64); the patch
embedding, final norm and classifier stay with the teacher. Routes, as for
ResNet-20 (benchmarks/bench_paper.py, Table 1):

* KD: the same student from random initialisation, end-to-end KD, ``--epochs``;
* ND: every block distilled (activation cache, 2 worker processes), stitched;
* ND + FT: ND, then end-to-end KD fine-tuning for ``--ft-epochs``.

Every route trains on the first ``--examples`` training images and is measured
on the full 10,000-image test set; times count training (every ND stage
included), not evaluation. Writes benchmarks/results/transformer.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_paper import nd, time_to_kd
from common import CACHE, DATA, ROOT, log, machine, open_data, write

from ndc.finetune import TrainConfig, accuracy, train
from ndc.ir import Spec
from ndc.load import load_model
from ndc.metrics import count_params
from ndc.plan import load_teacher, partition_model, write_plan
from ndc.stitch import fresh_student, uniform_selection
from ndc.workspace import Workspace

MODEL = f"{ROOT / 'examples' / 'transformers_models.py'}:fashion_vit"
INPUT_SHAPE = (1, 1, 28, 28)


def teacher_path(epochs: int, lr: float, examples: int | None):
    return CACHE / f"teacher-vit-fmnist-e{epochs}-lr{lr:g}{f'-n{examples}' if examples else ''}.safetensors"


def teacher_weights(epochs: int, lr: float, examples: int | None = None) -> dict:
    """Train the ViT teacher once (its traced graph, by cross entropy on the training images) and cache its weights."""
    path = teacher_path(epochs, lr, examples)
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    from safetensors.torch import save_file

    CACHE.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loaded = load_model(MODEL)
    _, traced = partition_model(loaded, INPUT_SHAPE)
    data = open_data(DATA, INPUT_SHAPE[1:], limit=examples)
    log(f"training the ViT teacher on {data.train_size} images for {epochs} epochs (once; cached)")
    result = train(traced.gm, data, TrainConfig(loss="ce", epochs=epochs, lr=lr, batch_size=128, seed=0, augment=False),
                   log=lambda e: e.get("event") == "epoch" and log(f"  epoch {e['epoch']}: {e['accuracy']:.2%}"))
    save_file({k: v.contiguous() for k, v in traced.gm.state_dict().items()}, str(path))
    info = {"accuracy": result["best_accuracy"], "seconds": result["seconds"], "epochs": epochs, "lr": lr,
            "train_examples": data.train_size, "params": count_params(traced.gm), "machine": machine()}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--teacher-lr", type=float, default=0.05)
    ap.add_argument("--teacher-examples", type=int, default=None, help="train the teacher on the first N images (default: all)")
    ap.add_argument("--epochs", type=int, default=8, help="end-to-end KD epochs")
    ap.add_argument("--nd-epochs", type=int, default=4, help="epochs of every neighbourhood job")
    ap.add_argument("--ft-epochs", type=int, default=4, help="fine-tuning epochs after ND")
    ap.add_argument("--kd-lr", type=float, default=0.05)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--nd-lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    info = teacher_weights(args.teacher_epochs, args.teacher_lr, args.teacher_examples)

    ws = Workspace(CACHE / "bench-transformer")
    loaded = load_model(MODEL, weights=str(teacher_path(args.teacher_epochs, args.teacher_lr, args.teacher_examples)))
    plan, _ = partition_model(loaded, INPUT_SHAPE)
    write_plan(ws, plan, loaded.model)
    teacher = load_teacher(ws)
    data = open_data(DATA, INPUT_SHAPE[1:], limit=args.examples, workspace=ws)
    spec = Spec(width=args.width)
    selection = uniform_selection(teacher.plan, spec)
    row: dict = {"width": args.width, "teacher_accuracy": accuracy(teacher.gm, data), "teacher_params": count_params(teacher.gm),
                 "neighbourhoods": teacher.plan.names, "trainable": [nb.name for nb in teacher.plan.trainable]}
    log(f"teacher: {row['teacher_accuracy']:.2%}, {row['teacher_params']} parameters; distilling {len(row['trainable'])} blocks")

    model = fresh_student(teacher, selection)
    row["student_params"] = count_params(model)
    r = train(model, data, TrainConfig(loss="kd", epochs=args.epochs, lr=args.kd_lr, augment=False), teacher=teacher.gm,
              log=lambda e: e.get("event") == "epoch" and log(f"KD epoch {e['epoch']}: {e['accuracy']:.2%}"))
    row["kd"] = {"accuracy": r["history"][-1]["accuracy"], "best_accuracy": r["best_accuracy"], "seconds": r["seconds"],
                 "history": r["history"], "lr": args.kd_lr, "epochs": args.epochs}

    out = nd(ws, teacher, data, spec, args.nd_epochs, args.workers, args.examples, lr=args.nd_lr)
    log(f"ND: {out['accuracy']:.2%} in {out['seconds']:.0f}s")
    row["nd"] = {key: out[key] for key in ("accuracy", "seconds", "distill_seconds", "stitch_seconds", "final_errors")}
    row["nd"]["epochs"] = args.nd_epochs
    t0 = time.perf_counter()
    r = train(out["student"], data, TrainConfig(loss="kd", epochs=args.ft_epochs, lr=args.ft_lr, augment=False),
              teacher=teacher.gm, log=lambda e: e.get("event") == "epoch" and log(f"ND+FT epoch {e['epoch']}: {e['accuracy']:.2%}"))
    row["nd_ft"] = {"accuracy": r["history"][-1]["accuracy"], "best_accuracy": r["best_accuracy"],
                    "seconds": out["seconds"] + r["seconds"], "finetune_seconds": r["seconds"], "history": r["history"],
                    "lr": args.ft_lr, "epochs": args.ft_epochs, "wall_seconds": time.perf_counter() - t0 + out["seconds"]}
    row["time_to_accuracy"] = tta = time_to_kd(row["kd"], r["history"], out)
    log(f"time to {tta['target']:.2%}: KD {tta['kd_seconds']}, ND+FT {tta['nd_ft_seconds']}")
    write("transformer.json", {"examples": args.examples, "workers": args.workers, "teacher": info, "model": MODEL,
                               "command": "python benchmarks/bench_transformer.py " + " ".join(
                                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "row": row})


if __name__ == "__main__":
    main()
