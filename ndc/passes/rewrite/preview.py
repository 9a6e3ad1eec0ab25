"""What a candidate's student would be, without training it: ``ndc distill --dry-run``."""

from __future__ import annotations

import torch.fx as fx

from ndc.ir import Spec
from ndc.metrics import count_flops, count_nonzero_params, count_params
from ndc.passes.rewrite.width import make_student


def preview(part: fx.GraphModule, spec: Spec, name: str, input_shape: list[int], *, round_to: int = 1) -> dict:
    """Size and cost of the student of neighbourhood ``name`` under ``spec``, and which dimensions shrank.

    Returns ``{"neighbourhood", "spec", "teacher_params", "teacher_flops",
    "student_params", "student_nonzero_params", "student_flops",
    "shrunk_dims", "kept_dims"}``; each dims entry is a report row
    ``{"dim", "teacher", "student", "shrunk", "why"}``. Non-zero parameters
    count the sparsity masks at the spec's target. The teacher part is not
    modified.
    """
    student = make_student(part, spec, round_to=round_to)
    if student.pruner is not None:
        student.pruner.update(spec.sparsity)
    return {
        "neighbourhood": name,
        "spec": str(spec),
        "teacher_params": count_params(part),
        "teacher_flops": count_flops(part, input_shape),
        "student_params": count_params(student.module),
        "student_nonzero_params": count_nonzero_params(student.module),
        "student_flops": count_flops(student.module, input_shape),
        "shrunk_dims": [row for row in student.report if row["shrunk"]],
        "kept_dims": [row for row in student.report if not row["shrunk"]],
    }


def format_preview(rows: list[dict]) -> str:
    """The ``--dry-run`` table: one line per candidate, then what shrank and what stayed (and why)."""
    if not rows:
        return "no candidates\n"
    table = [("neighbourhood", "spec", "teacher params", "student params", "ratio", "student FLOPs")]
    for r in rows:
        ratio = r["student_params"] / r["teacher_params"] if r["teacher_params"] else 1.0
        params = f"{r['student_params']:,}"
        if r.get("student_nonzero_params", r["student_params"]) != r["student_params"]:
            params += f" ({r['student_nonzero_params']:,} non-zero)"
        table.append((r["neighbourhood"], r["spec"], f"{r['teacher_params']:,}", params, f"{ratio:.1%}",
                      _si(r["student_flops"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append("dimensions:")
    for r in rows:
        for d in r["shrunk_dims"]:
            lines.append(f"  {r['neighbourhood']} [{r['spec']}]  shrunk  {d['dim']}: {d['teacher']} -> {d['student']}")
        for d in r["kept_dims"]:
            lines.append(f"  {r['neighbourhood']} [{r['spec']}]  kept    {d['dim']}: {d['teacher']} ({d['why']})")
    return "\n".join(lines) + "\n"


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
