"""Evaluation: a model's score on a data set, the teacher's, and their agreement.

``evaluate`` takes whatever a user has at hand: an ``nn.Module`` (a teacher,
a stitched student), a ``torch.export`` program, an onnxruntime session, or
the result of :func:`~ndc.formats.load_exported` on an exported file. Every
model sees the same batches in the same order, so two models evaluated on the
same :class:`~ndc.data.DataSource` are compared example by example. The
numbers come from :mod:`ndc.scoring`, as everywhere else.

>>> data = open_data("digits", (3, 32, 32), limit=200)            # doctest: +SKIP
>>> evaluate(load_for_eval("student.onnx"), data, teacher=teacher.gm)   # doctest: +SKIP
{'metric': 'accuracy', 'score': 0.91, 'teacher_score': 0.93, 'agreement': 0.96, 'examples': 200, ...}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ndc.formats import Predictor, load_exported
from ndc.scoring import Metric, runner, scores

if TYPE_CHECKING:
    from ndc.data import DataSource

__all__ = ["Predictor", "evaluate", "load_for_eval"]


def load_for_eval(path, *, trust_pickle: bool = False) -> Predictor:
    """Open an exported model for evaluation (:func:`ndc.formats.load_exported` with this process's threads)."""
    return load_exported(path, trust_pickle=trust_pickle, threads=torch.get_num_threads())


def evaluate(model: Any, data: DataSource, *, split: str = "test", teacher: Any = None,
             metric: Metric | None = None, batch_size: int = 256, device: str = "cpu") -> dict:
    """``model``'s score on ``data``'s ``split``; with ``teacher``, the teacher's own score and their agreement.

    ``model`` and ``teacher``: anything :func:`ndc.scoring.runner` runs.
    ``metric`` defaults to accuracy; class labels the model has no output for
    are refused first, naming the example. Returns ``metric``, ``score`` and
    ``examples``; with a teacher also ``teacher_score`` (when the metric
    scores against the labels or is a function) and ``agreement`` (when it
    scores classes); with the accuracy metric the same numbers also under
    their old names ``accuracy`` and ``teacher_accuracy``.
    """
    metric = metric or Metric("accuracy")
    first = next(data.batches(split, 2), None)
    if metric.needs_labels and data.labels == "classes" and first is not None:
        with runner(model, device, "the model", data.name) as run:
            out = run(first[0])
        if out.dim() == 2:
            data.check_classes(out.shape[1])
    batches = data.batches(split, batch_size)
    agreement = teacher is not None and metric.needs_labels and metric.of_classes
    own = [metric] + ([Metric("agreement", metric.threshold)] if agreement else [])
    theirs = [metric] if teacher is not None and not metric.needs_teacher else []
    values, teacher_values, n = scores(model, batches, own, teacher=teacher, teacher_metrics=theirs, device=device,
                                     source=data.name)
    result: dict[str, Any] = {"metric": metric.name, "score": values[0]}
    if theirs:
        result["teacher_score"] = teacher_values[0]
    if teacher is not None:
        result["agreement"] = values[0] if metric.kind == "agreement" else (values[1] if len(values) > 1 else None)
    if metric.kind == "accuracy":
        result["accuracy"] = values[0]
        if theirs:
            result["teacher_accuracy"] = teacher_values[0]
    result["examples"] = n
    return result


# ----------------------------------------------------------- what a model file reads


def file_inputs(predictor):
    """The :class:`~ndc.passes.inputs.InputSpec` of a loaded model file: token ids below the vocabulary of the
    embedding that reads its input, floats, or None when the file does not say (a pickled module that is no graph).

    ONNX: the input's element type, and the rows of the initializer a ``Gather`` looks the input up in; a graph
    (.pt2, or a pickled fx graph): the rows of the weight an ``embedding`` looks the input up in. Only reshapes and
    casts may stand between the input and the lookup; several lookups give the smallest table.
    """
    from ndc.passes.inputs import FLOAT, InputSpec

    if predictor.kind == "onnx":
        session_inputs = getattr(predictor.latency_target, "get_inputs", lambda: [])()
        if session_inputs and not session_inputs[0].type.startswith("tensor(int"):  # ids: int64, int32, ...
            return FLOAT  # known without reading the graph
        integer, rows = _onnx_lookup(predictor.path)
    else:
        integer, rows = _graph_lookup(predictor.module)
    if integer is False:
        return FLOAT
    if rows:
        return InputSpec("int64", min(rows))
    return None


_PASS_THROUGH = {"reshape", "view", "flatten", "squeeze", "unsqueeze", "cast", "identity", "to", "_to_copy", "clone",
                 "contiguous", "expand", "transpose", "permute", "_unsafe_view"}


def _onnx_lookup(path) -> tuple[bool | None, list[int]]:
    try:
        import onnx

        graph = onnx.load(str(path)).graph
    except Exception:
        return None, []
    tables = {t.name: list(t.dims) for t in graph.initializer}
    real = [i for i in graph.input if i.name not in tables]
    if not real:
        return None, []
    integers = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8}
    if real[0].type.tensor_type.elem_type not in integers:
        return False, []
    reads, rows = {real[0].name}, []
    for node in graph.node:  # topologically sorted
        if node.op_type.lower() in _PASS_THROUGH and node.input and node.input[0] in reads:
            reads.update(node.output)
        elif (node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in reads
              and len(tables.get(node.input[0], [])) == 2
              and all(a.i == 0 for a in node.attribute if a.name == "axis")):
            rows.append(int(tables[node.input[0]][0]))
    return True, rows


def _graph_lookup(module) -> tuple[bool | None, list[int]]:
    graph = getattr(module, "graph", None)
    if graph is None or not hasattr(graph, "nodes"):
        return None, []
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    if first is None:
        return None, []
    reads, rows = {first}, []
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or not node.args or node.args[0] is None:
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        name = name.split(".")[0].lower()
        if node.op == "call_module":
            sub = module.get_submodule(node.target)
            if isinstance(sub, torch.nn.Embedding) and node.args[0] in reads:
                rows.append(sub.num_embeddings)
        elif name in _PASS_THROUGH and node.args[0] in reads:
            reads.add(node)
        elif name == "embedding" and len(node.args) > 1 and node.args[1] in reads:
            weight = _value(module, node.args[0])
            if weight is not None and weight.dim() == 2:
                rows.append(int(weight.shape[0]))
    if rows:
        return True, rows
    value = first.meta.get("val")
    if isinstance(value, torch.Tensor):
        return not value.dtype.is_floating_point, []
    return None, []


def _value(module, node):
    """The tensor behind a weight node of a graph: an attribute (get_attr) or the recorded value of a placeholder."""
    import operator

    if getattr(node, "op", None) == "get_attr":
        try:
            return operator.attrgetter(node.target)(module)
        except AttributeError:
            return None
    value = getattr(node, "meta", {}).get("val")
    return value if hasattr(value, "shape") else None
