"""rewrite: a teacher neighbourhood and a spec -> a student neighbourhood with the same boundary shapes.

The pass reads top to bottom:

* :mod:`.dims` -- channel atoms, layouts, union-find (the data structure);
* :mod:`.analysis` -- :func:`analyse`: one walk over the graph, asking the
  rule of each node how it couples channels (propose; nothing is modified);
* :mod:`.registry` / :mod:`.rules` -- operator kind -> rule; one entry per
  supported operator (see ``docs/rewrite-rules.md`` to add one); :mod:`.aten`
  registers the ATen operators of exported graphs (the torch.export frontend);
* :mod:`.width` -- :func:`make_student` / :func:`rebuild_student`: choose
  the kept channels, slice a deep copy, check every shape;
* :mod:`.prune` -- :class:`Pruner` and :func:`sparsity_schedule`;
* :mod:`.preview` -- :func:`preview` / :func:`format_preview` for ``--dry-run``.
"""

from ndc.passes.rewrite import aten as _aten  # noqa: F401  (ATen operators of exported graphs)
from ndc.passes.rewrite import rules as _rules  # noqa: F401  (fills the registry)
from ndc.passes.rewrite.analysis import Analysis, analyse
from ndc.passes.rewrite.preview import format_preview, preview
from ndc.passes.rewrite.prune import Pruner, sparsity_schedule
from ndc.passes.rewrite.registry import RULES, Registry
from ndc.passes.rewrite.width import Student, make_student, rebuild_student, student_size

__all__ = [
    "Student",
    "make_student",
    "rebuild_student",
    "Pruner",
    "sparsity_schedule",
    "preview",
    "format_preview",
    "analyse",
    "Analysis",
    "Registry",
    "RULES",
    "student_size",
]
