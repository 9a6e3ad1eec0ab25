"""Options and output helpers shared by every command.

Conventions (see docs/cli.md):

* every command takes ``-w/--workspace DIR`` (default ``./ndc-work``) and
  ``--format text|json``;
* with ``--format json`` exactly one JSON document goes to stdout, everything
  else (progress, warnings) to stderr;
* a user error is one line, ``Error: ...``, and exit status 1; exit status 2
  is a command line that does not parse (an unknown option, a value of the
  wrong type or outside a declared range: click's usage error, with the usage
  line). A value that parses but is checked later (a spec, a shape, a device,
  a NaN rate) is a user error, exit 1.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ndc.errors import NdcError, Terminated

DEFAULT_WORKSPACE = "ndc-work"


def workspace_option(f: Callable) -> Callable:
    return click.option(
        "-w",
        "--workspace",
        default=DEFAULT_WORKSPACE,
        show_default=True,
        type=click.Path(file_okay=False),
        help="Workspace directory holding every stage's artefacts.",
    )(f)


def format_option(f: Callable) -> Callable:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Output format; json prints exactly one JSON document on stdout (none on an error).",
    )(f)


def data_options(f: Callable) -> Callable:
    """``--data SPEC`` and ``--limit N``, the same for every command that reads data."""
    f = click.option(
        "--limit",
        type=click.IntRange(min=1),
        default=None,
        help="Use only the first N training and N test examples.",
    )(f)
    return click.option(
        "--data",
        "data_spec",
        default=None,
        metavar="SPEC",
        help="Data set: fashion-mnist[:DIR], mnist:DIR, digits, file.npz, imagefolder:DIR, text:FILE[,TOKENIZER], "
             "module:function. Stages after distill default to the data (and --limit, --normalize) distill used.",
    )(f)


def remembered_data(applies: Callable[[dict], bool] = lambda kwargs: True):
    """Without ``--data``, the command reads the data ``ndc distill`` used in its workspace (``--limit`` and
    ``--normalize`` too, unless given), and says so on stderr: stages chain without repeating arguments.
    ``applies(kwargs)`` says whether that fits the command's arguments (probe: not for a MODEL file, traced in
    memory). The workspace is MODEL when that is a directory, else ``-w``."""

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not kwargs.get("data_spec") and applies(kwargs):
                from ndc.stages import remembered_data as read
                from ndc.workspace import Workspace

                model = kwargs.get("model")
                found = read(Workspace(model if model is not None and Path(model).is_dir() else kwargs["workspace"]))
                if found is not None:
                    kwargs["data_spec"] = found.data
                    for name in ("limit", "normalize"):
                        if not given(name):
                            kwargs[name] = getattr(found, name)
                    used = type(found)(found.data, kwargs["limit"], kwargs["normalize"])
                    if not kwargs.get("quiet"):
                        click.echo(f"data: {used.flags}, {'as' if used == found else 'from what'} ndc distill used "
                                   "(give --data to choose)", err=True)
            return f(*args, **kwargs)

        return wrapper

    return wrap


def given(name: str) -> bool:
    """The current command's option ``name`` was given (on the command line or by the environment), not defaulted."""
    return click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT


def on_workspace(kwargs: dict) -> bool:
    """The command's MODEL argument is absent or a directory: it works on a workspace."""
    return kwargs.get("model") is None or Path(kwargs["model"]).is_dir()


def normalize_option(f: Callable) -> Callable:
    """``--normalize stats|none|MEAN/STD``; the command receives the value for ``ndc.data.open_data(normalize=...)``."""

    def parse(ctx: click.Context, param: click.Parameter, value: str) -> Any:
        from ndc.data import parse_normalize

        try:
            return parse_normalize(value)
        except NdcError as e:
            raise click.BadParameter(str(e)) from None

    return click.option(
        "--normalize",
        default="stats",
        show_default=True,
        metavar="stats|none|MEAN/STD",
        callback=parse,
        help="Input normalisation: training-set statistics, none, or per-channel (or per-feature) values "
        "such as 0.485,0.456,0.406/0.229,0.224,0.225 (what a pretrained teacher was trained with).",
    )(f)


def device_option(f: Callable) -> Callable:
    """``--device cpu|cuda|cuda:N`` for every command that trains or evaluates."""
    return click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
                        help="Where models train and run: cpu, or cuda (a GPU).")(f)


COMPILE_CHOICES = ("none", "default", "reduce-overhead", "max-autotune")  # ndc.training.COMPILE_MODES, without importing torch


def compile_option(f: Callable) -> Callable:
    """``--compile MODE`` for every command that trains (distill, finetune, kd)."""
    return click.option("--compile", "compile_mode", type=click.Choice(COMPILE_CHOICES), default="none", show_default=True,
                        help="Train through torch.compile in this mode (reduce-overhead adds CUDA graphs on a GPU); the "
                             "first run pays the compilation, which PyTorch caches on disk for later runs.")(f)


def metric_option(what: str = "Score"):
    """``--metric NAME``: how eval, search, probe and training score a model (see ndc.scoring)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str) -> str:
        from ndc.scoring import parse_metric

        if value != "auto":
            try:
                parse_metric(value)
            except NdcError as e:
                raise click.BadParameter(str(e)) from None
        return value

    return click.option(
        "--metric",
        default="auto",
        show_default=True,
        metavar="NAME",
        callback=parse,
        help=f"{what}: accuracy, top-K (e.g. top-5), agreement (with the teacher), r2, rmse or mae (against "
        "real-valued targets), output-error (relative to the teacher, lower is better), or module:function / "
        "file.py:function computing fn(student_out, teacher_out, y) -> float; auto: accuracy when the labels fit the "
        "teacher's output, r2 for real-valued targets that do, else agreement for class scores, else output-error.",
    )


def teacher_head(teacher: Any) -> Any:
    """The :class:`ndc.heads.Head` of a workspace teacher (see :func:`ndc.heads.teacher_head`)."""
    from ndc.heads import teacher_head as head

    return head(teacher)


def pick_metric(requested: str, data: Any, head: Any, labels_must_fit: bool = False, without_teacher: str = "") -> Any:
    """:func:`ndc.scoring.pick_metric`, saying on stderr why auto settled for less than accuracy."""
    from ndc.scoring import pick_metric as pick

    return pick(requested, data, head, labels_must_fit=labels_must_fit, without_teacher=without_teacher, warn=warn)


def finite_float(what: str = "a finite number", positive: bool = False) -> click.ParamType:
    """A click float type that refuses NaN and infinity (and, with ``positive``, zero and below) while the command
    line is parsed, before any work: a NaN learning rate would otherwise pass every ``<=`` check and poison
    training. The refusal is one line and exit status 1, like every other bad input."""

    class Finite(click.ParamType):
        name = "float"

        def convert(self, value: Any, param: Any, ctx: Any) -> float:
            number = click.FLOAT.convert(value, param, ctx)
            if not math.isfinite(number) or (positive and not number > 0):
                option = param.opts[-1] if param is not None and param.opts else "the value"
                raise click.ClickException(f"{option} must be {what}, not {value}")
            return number

    return Finite()


def common_options(f: Callable) -> Callable:
    return workspace_option(format_option(f))


def user_errors(f: Callable) -> Callable:
    """Turn :class:`NdcError` and a full disk into one clear line and exit status 1."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except NdcError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(os_error_line(e)) from None
        except Terminated:
            click.echo("terminated; finished artefacts are kept, run the command again to resume", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted; finished artefacts are kept, run the command again to resume", err=True)
            sys.exit(130)

    return wrapper


def os_error_line(e: OSError) -> str:
    """What the system refused, in one line that says what to do."""
    what = e.filename or "the workspace"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"{'file too large' if e.errno == errno.EFBIG else 'disk full'} while writing {what}; "
                "finished artefacts are intact, free some space and run the command again")
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"cannot write {what}: {e.strerror}"
    if e.errno == errno.ENAMETOOLONG:
        return f"a file name is too long: {what}"
    return f"{e.strerror or type(e).__name__}: {what}"


def emit(fmt: str, payload: dict, text: str | Callable[[], str]) -> None:
    """Print ``payload`` as one JSON document, or ``text`` for humans."""
    if fmt == "json":
        click.echo(json.dumps(payload, indent=2, sort_keys=False))
    else:
        click.echo(text() if callable(text) else text)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A plain text table; ``align`` has one letter per column, ``l`` or ``r``."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for k, row in enumerate(cells):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return "" if value is None else str(value)


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def selection_options(f):
    """``--width K | --spec SPEC | --selection FILE``: which trained student per neighbourhood."""
    f = click.option("--selection", "selection_file", type=click.Path(dir_okay=False), default=None,
                     help="JSON mapping neighbourhood -> spec (ndc search writes selection.json).")(f)
    f = click.option("--spec", "spec_text", default=None, metavar="SPEC", help="The same spec everywhere, e.g. width=0.5,sparsity=0.3.")(f)
    return click.option("--width", type=float, default=None, help="The width=K students everywhere.")(f)


def model_options(prefix: str = ""):
    """How to load and cut a MODEL (``ndc partition``, and ``ndc probe`` given a model instead of a workspace)."""

    def wrap(f: Callable) -> Callable:
        for option in reversed([
            click.option("--input-shape", "input_shape", default=None, metavar="N,C,H,W",
                         help=f"{prefix}Example input shape, e.g. 1,3,32,32 (default: the model's input_shape attribute, "
                              "else guessed from its first layer)."),
            click.option("--by", "by", default="auto", show_default=True, metavar="STRATEGY",
                         help=f"{prefix}Partition strategy: auto (residual blocks where the model has them, else layers), "
                              "residual, module, layers or cuts."),
            click.option("--depth", type=int, default=1, show_default=True, help=f"{prefix}--by module: cut after every submodule at this depth."),
            click.option("--every", type=click.IntRange(min=1), default=None,
                         help=f"{prefix}--by layers: cut after every N weight layers [default: 1; 2 where --by auto cuts a "
                              "plain chain, so that --width has channels to narrow]."),
            click.option("--cut", "cuts", multiple=True, metavar="NAME", help=f"{prefix}--by cuts: cut at this node or module (repeatable)."),
            click.option("--leaf", "leaves", multiple=True, metavar="MODULE", help=f"{prefix}Keep this submodule opaque when tracing (repeatable)."),
            click.option("--weights", default=None, type=click.Path(dir_okay=False),
                         help=f"{prefix}State dict (.pt, loaded weights-only) or .safetensors for a factory MODEL."),
            click.option("--trust-pickle", is_flag=True, help=f"{prefix}Allow unpickling MODEL (a torch.save'd module can run code when loaded)."),
        ]):
            f = option(f)
        return f

    return wrap


def trace_options(f: Callable) -> Callable:
    """How ``ndc partition`` traces MODEL: frontend, input dtype, which output."""
    for option in reversed([
        click.option("--frontend", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True,
                     help="Tracer: torch.fx, torch.export (ATen graphs; Hugging Face models), or auto: fx, then export "
                          "when fx fails or has to keep modules opaque."),
        click.option("--input-dtype", type=click.Choice(["float32", "int64"]), default=None,
                     help="The input's dtype: int64 for token ids (drawn below the model's vocabulary size) "
                          "[default: int64 for a Hugging Face model reading input_ids, else float32]."),
        click.option("--output", "output", default=None, metavar="NAME|INDEX",
                     help="Which output to compile when the model returns a tuple, dict or ModelOutput "
                          "[default: logits, else the first tensor]; dotted paths reach nested values."),
    ]):
        f = option(f)
    return f
