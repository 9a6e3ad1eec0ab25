"""Loading a teacher: a pickled module (trusted only), a factory plus weights, an archive or a Hugging Face folder.

MODEL forms:

* ``file.pt`` / ``file.pth``: a ``torch.save``\\ d ``nn.Module``. Unpickling runs
  code, so it is loaded only with ``trust_pickle=True``; without it the file is
  inspected statically (pickle opcodes are read, nothing is executed) only to
  give a precise error.
* ``package.module:factory`` or ``path/to/file.py:factory``: the factory is
  called with no arguments; ``weights`` (a state dict loaded with
  ``weights_only=True``, or ``.safetensors``) is loaded into the result.
* ``file.pt2``: a ``torch.export`` archive (``torch.export.save``). Loading it
  unpickles nothing, so it needs no trust: the safe answer for a user who has
  only a saved model and no factory. Its graph is what ndc traces (the export
  frontend), and it says its own input shape and dtype.
* ``folder/`` holding ``config.json``: a Hugging Face ``save_pretrained``
  folder. The class ``config.architectures[0]`` names is taken from the
  ``transformers`` package (a config that needs custom code, ``auto_map``, is
  refused: no code from the folder ever runs, nothing is downloaded) and loaded
  in float32 with the folder's ``model.safetensors`` (or sharded safetensors);
  ``pytorch_model.bin`` is a pickle, read only with ``trust_pickle=True``. The
  plan records the config itself, so later stages rebuild the architecture
  without the folder (the workspace keeps the weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import pickletools
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ndc.errors import NdcError, a_or_an, first_line
from ndc.usercode import working_folder_importable
from ndc.workspace import load_tensors, sha256_file

@dataclass
class LoadedModel:
    model: nn.Module
    source: dict  # JSON-able description of where the model came from (see Plan.source)
    input_shape: tuple[int, ...] | None = None  # known from the file itself (a .pt2 archive)
    inputs: object = None  # its InputSpec, when the file says (a .pt2 archive)


def load_model(spec: str, weights: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL as described in the module docstring; every failure is one :class:`NdcError` line."""
    if Path(spec).is_dir() and (Path(spec) / "config.json").is_file():
        if weights is not None:
            raise NdcError(f"--weights goes with a factory MODEL; the Hugging Face folder {spec} holds its weights")
        return _load_hf_folder(Path(spec), trust_pickle)
    if _is_factory(spec):
        model, source = _load_factory(spec)
        if weights is not None:
            source["weights"] = str(Path(weights).resolve())
            source["weights_sha256"] = _sha(weights)
            load_weights(model, weights)
        return LoadedModel(model, source)
    path = Path(spec)
    if path.suffix == ".pt2":
        if weights is not None:
            raise NdcError(f"--weights goes with a factory MODEL; the archive {spec} holds its weights")
        source = {"kind": "export", "path": str(path.resolve()), "sha256": _sha(path) if path.is_file() else None,
                  "trust_pickle": trust_pickle}
        gm, shape, inputs = _load_program(path, trust_pickle)
        return LoadedModel(gm, source, shape, inputs)
    if path.is_dir() or path.suffix == ".safetensors":
        what = "a folder" if path.is_dir() else "weights without an architecture"
        raise NdcError(f"{spec} is {what}; give a factory that builds the model and the weights file: "
                       f"ndc partition my_model.py:make --weights {path / 'model.safetensors' if path.is_dir() else path}"
                       + (" (a Hugging Face save_pretrained folder would hold config.json, which names its architecture)"
                          if path.is_dir() else ""))
    if weights is not None:
        raise NdcError(f"--weights goes with a factory MODEL (file.py:factory or package.module:factory), not with the pickled module {spec}")
    return LoadedModel(_load_pickled_module(path, trust_pickle), {
        "kind": "pickle",
        "path": str(path.resolve()),
        "sha256": _sha(path),
        "trust_pickle": True,
    })


def reload_model(source: dict) -> nn.Module:
    """Rebuild the teacher's architecture from a plan's ``source`` record.

    Refuses a pickle whose content changed since it was trusted, so trust given
    to one file at ``ndc partition`` never extends to another.
    """
    if source["kind"] == "export":
        path = Path(source["path"])
        if not path.is_file():
            raise NdcError(f"the teacher {path} named in the plan no longer exists; rerun ndc partition")
        if source.get("sha256") is not None and sha256_file(path) != source["sha256"]:
            raise NdcError(f"the teacher {path} changed since ndc partition; rerun ndc partition")
        return _load_program(path, bool(source.get("trust_pickle")))[0]
    if source["kind"] == "pickle":
        path = Path(source["path"])
        if not path.is_file():
            raise NdcError(f"the teacher {path} named in the plan no longer exists; rerun ndc partition")
        if sha256_file(path) != source["sha256"]:
            raise NdcError(f"the teacher {path} changed since ndc partition trusted it; rerun ndc partition")
        return _load_pickled_module(path, trust_pickle=bool(source.get("trust_pickle")))
    if source["kind"] == "huggingface":
        return _rebuild_hf(source)
    model, _ = _load_factory(source["target"])
    return model


# ------------------------------------------------------------------ archives


def _load_program(path: Path, trust_pickle: bool = False):
    """A ``.pt2`` archive as a graph (see :func:`ndc.passes.trace_export.load_program`); nothing that could run code
    is unpickled unless ``trust_pickle``."""
    from ndc.passes.trace_export import load_program

    if not path.is_file():
        raise NdcError(f"{path}: no such file")
    program = read_program(path, trust_pickle)
    try:
        return load_program(program, str(path))
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:  # a trusted archive with odd contents
        raise NdcError(f"{path} is not a readable torch.export archive: {type(e).__name__}: {first_line(e, 160)}") from None


def read_program(path: Path, trust_pickle: bool = False):
    """The ``ExportedProgram`` in a ``.pt2`` archive (a Hugging Face ModelOutput's class imported when it needs
    one), without torch's log lines; every failure is one :class:`NdcError` line.

    ``torch.export.load`` unpickles some members of an archive (example
    inputs, opaque constants) and falls back to a full, code-running unpickler
    when the safe one refuses them. Unless ``trust_pickle``, that fallback is
    refused: an archive holding anything but tensors and plain containers is
    one line naming ``--trust-pickle``.
    """
    program = _read_program(path, trust_pickle)
    if isinstance(program, str) and _import_outputs_of(program):
        program = _read_program(path, trust_pickle)  # a Hugging Face ModelOutput: defining its class registers it
    if isinstance(program, str):
        raise NdcError(f"{path} returns {a_or_an(program)}, which is not registered with torch's pytree here, so the archive "
                       "cannot be read; export a wrapper whose forward returns a tensor "
                       "(forward(self, x): return self.model(x).logits)")
    return program


def _read_program(path: Path, trust_pickle: bool):
    """``torch.export.load`` without its log lines: the program, or the name of the output class it could
    not rebuild; any other failure is one line."""
    # torch logs the real cause (with a traceback), then raises a vaguer one; its serialiser logs too
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    errors: list[BaseException] = []
    handler = logging.Handler()
    handler.emit = lambda record: errors.append(record.exc_info[1]) if record.exc_info else None
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [handler], False
    refused: list[str] = []
    try:
        with warnings.catch_warnings(), _safe_unpickling(refused, trust_pickle):
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as e:
        if refused:
            raise NdcError(f"{path} holds pickled objects besides tensors ({refused[0]}), and unpickling them can run "
                           "arbitrary code; pass --trust-pickle if you made or trust this file") from None
        causes = [m for m in map(_UNREGISTERED.search, map(str, errors)) if m]
        if causes:
            return causes[0].group(1)
        raise NdcError(f"{path} is not a readable torch.export archive: {first_line(e, 160)}") from None
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate


@contextlib.contextmanager
def _safe_unpickling(refused: list[str], trust: bool):
    """While ``torch.export.load`` runs: ``torch.load`` only with ``weights_only=True`` and no plain ``pickle.loads``
    in the archive reader (each refusal is appended to ``refused``), unless ``trust``."""
    if trust:
        yield
        return
    import pickle

    import torch.export.pt2_archive._package as package

    load = torch.load

    def weights_only(*args, **kwargs):
        if kwargs.get("weights_only") is False:
            refused.append("an object torch.load reads only with weights_only=False")
        kwargs["weights_only"] = True
        return load(*args, **kwargs)

    class NoLoads:
        def __getattr__(self, name):
            return getattr(pickle, name)

        def loads(self, *args, **kwargs):
            refused.append("a pickled constant")
            raise pickle.UnpicklingError("refused: unpickling can run code")

    saved = package.pickle
    torch.load, package.pickle = weights_only, NoLoads()
    try:
        yield
    finally:
        torch.load, package.pickle = load, saved


_UNREGISTERED = re.compile(r"Deserializing (\S+) in pytree is not registered")


def _import_outputs_of(name: str) -> bool:
    """Import the transformers module that defines the class ``name`` (defining a ModelOutput registers it)."""
    module = name.rpartition(".")[0]
    if not module.startswith("transformers.") or importlib.util.find_spec("transformers") is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


# ------------------------------------------------------- Hugging Face folders

_HF_SAFE = ("model.safetensors", "model.safetensors.index.json")
_HF_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _load_hf_folder(folder: Path, trust_pickle: bool) -> LoadedModel:
    """A ``save_pretrained`` folder: the class its ``config.json`` names, from the ``transformers`` package, with the
    folder's weights (safetensors; a ``pytorch_model.bin`` pickle only with ``trust_pickle``), in float32 and eval mode.
    Nothing is downloaded and no code from the folder runs."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise NdcError(f"{folder / 'config.json'} is not readable JSON: {first_line(e, 160)}") from None
    cls = _hf_class(config, folder)
    safe = [name for name in _HF_SAFE if (folder / name).is_file()]
    pickled = [name for name in _HF_PICKLE if (folder / name).is_file()]
    if not safe and not pickled:
        raise NdcError(f"{folder} has a config.json but no weights (model.safetensors, sharded model.safetensors.index.json "
                       "or pytorch_model.bin); save the model with save_pretrained")
    if not safe and not trust_pickle:
        raise NdcError(f"{folder} holds its weights as {pickled[0]}, a pickle: unpickling can run arbitrary code. Pass "
                       "--trust-pickle if you made or trust this folder, or save it again as safetensors "
                       "(model.save_pretrained(folder))")
    files = ["config.json"] + _hf_weight_files(folder, safe[0] if safe else pickled[0])
    with _quiet_transformers():
        try:
            model, info = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                              use_safetensors=bool(safe), dtype=torch.float32, output_loading_info=True)
        except Exception as e:
            raise NdcError(f"transformers could not load {folder} as {cls.__name__}: {type(e).__name__}: "
                           f"{first_line(e, 200)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise NdcError(f"the weights in {folder} do not fill {cls.__name__}: missing {len(missing)} key(s) ({_few(missing)}), "
                       "which transformers would initialise at random; save the model with save_pretrained")
    import transformers

    source = {
        "kind": "huggingface",
        "path": str(folder.resolve()),
        "architecture": cls.__name__,
        "config": json.loads(model.config.to_json_string(use_diff=False)),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "transformers": transformers.__version__,
        "files": files,
        "sha256": _sha_files(folder, files),
    }
    return LoadedModel(model.eval(), source)


def _hf_class(config: dict, folder: Path):
    """The ``transformers`` class ``config.json``'s ``architectures`` names; custom code is refused."""
    if not isinstance(config, dict):
        raise NdcError(f"{folder / 'config.json'} does not hold a Hugging Face config (a JSON object)")
    factory = f"give a factory that builds the model instead: ndc partition my_model.py:make --weights {folder / 'model.safetensors'}"
    if config.get("auto_map"):
        raise NdcError(f"{folder} needs custom code (config.json has auto_map), which ndc never runs; {factory}")
    names = config.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise NdcError(f"{folder / 'config.json'} names no architecture (no \"architectures\" list); {factory}")
    transformers, cls = _transformers_class(names[0], f"{folder} is a Hugging Face model; loading it")
    if cls is None:
        raise NdcError(f"{folder}: transformers {transformers.__version__} has no model class {names[0]} "
                       f"(config.json's architecture); {factory}")
    return cls


def _transformers_class(name: str, doing: str):
    """The ``transformers`` package and its model class ``name`` (None when it has none); ``doing`` says what needs
    the package when it is not installed."""
    try:
        import transformers
    except ImportError:
        raise NdcError(f"{doing} needs the transformers package (pip install transformers)") from None
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # a lazy import of an optional backend failed
        cls = None
    found = isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_pretrained")
    return transformers, cls if found else None


def _hf_weight_files(folder: Path, name: str) -> list[str]:
    """``name`` and, for a sharded checkpoint's index, the shards it lists."""
    if not name.endswith(".index.json"):
        return [name]
    try:
        shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise NdcError(f"{folder / name} is not a readable index of shards: {first_line(e, 160)}") from None
    for shard in shards:
        if not (folder / shard).is_file():
            raise NdcError(f"{folder / name} lists the shard {shard}, which is missing")
    return [name, *shards]


def _sha_files(folder: Path, names: list[str]) -> str:
    """One hash of several files: the hash of their names and hashes."""
    return hashlib.sha256("".join(f"{name} {_sha(folder / name)}\n" for name in names).encode()).hexdigest()


def _rebuild_hf(source: dict) -> nn.Module:
    """The architecture of a Hugging Face teacher from the plan alone (its weights come from the workspace)."""
    name = source["architecture"]
    transformers, cls = _transformers_class(name, f"the teacher is a Hugging Face {name}; rebuilding it")
    if cls is None:
        raise NdcError(f"transformers {transformers.__version__} has no model class {name}, which the plan's teacher is "
                       f"(ndc partition used transformers {source.get('transformers')}); rerun ndc partition")
    kwargs = {"attn_implementation": source["attn_implementation"]} if source.get("attn_implementation") else {}
    with _quiet_transformers():
        try:
            config = cls.config_class.from_dict(dict(source["config"]), **kwargs)
            model = cls(config)
        except Exception as e:
            raise NdcError(f"transformers {transformers.__version__} cannot rebuild {source['architecture']} from the "
                           f"config in plan.json ({type(e).__name__}: {first_line(e, 160)}); rerun ndc partition") from None
    return model.to(torch.float32).eval()


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or loading reports from transformers: ndc says what matters itself."""
    from transformers.utils import logging as hf_logging

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------ factories


def _is_factory(spec: str) -> bool:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        return False
    # "C:\\model.pt" style paths never reach here on the platforms ndc supports.
    return True


def _load_factory(spec: str, seed: int = 0) -> tuple[nn.Module, dict]:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise NdcError(f"{target}: no such file")
        module = _import_file(path)
        file, resolved = path.resolve(), f"{path.resolve()}:{attr}"
    else:
        working_folder_importable()
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise NdcError(f"cannot import module {target!r} ({e}); give a path like models.py:{attr} or install the package") from None
        file, resolved = getattr(module, "__file__", None), spec
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise NdcError(f"{target} has no callable {attr!r}")
    # A fixed seed makes a factory without --weights give the same teacher every
    # time, so the same MODEL always gives the same plan.
    torch.manual_seed(seed)
    try:
        model = factory()
    except Exception as e:
        raise NdcError(f"factory {spec} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise NdcError(f"factory {spec} returned {type(model).__name__}, not an nn.Module")
    return model, {"kind": "factory", "target": resolved, "sha256": _sha(file) if file else None}


RANDOM_CHECK_PARAMS = 50_000_000  # a larger model is not built twice to find out


def random_parameters(spec: str, model: nn.Module) -> list[str]:
    """The parameters of ``model``, built by the factory ``spec``, that the factory initialises at random: built again
    under another seed, they differ (a factory that loads its weights gives the same values)."""
    from torch.nn.parameter import is_lazy

    state = torch.random.get_rng_state()
    try:  # only a warning depends on it: whatever goes wrong, say nothing
        if not _is_factory(spec) or sum(p.numel() for p in model.parameters() if not is_lazy(p)) > RANDOM_CHECK_PARAMS:
            return []
        other, _ = _load_factory(spec, seed=1)
        theirs = {name: p for name, p in other.named_parameters() if not is_lazy(p)}
        return [name for name, p in model.named_parameters()
                if name in theirs and not is_lazy(p) and p.shape == theirs[name].shape and p.is_floating_point()
                and not torch.equal(p.detach().cpu(), theirs[name].detach().cpu())]
    except Exception:
        return []
    finally:
        torch.random.set_rng_state(state)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' (or '1x3x32x32') -> (1, 3, 32, 32)."""
    try:
        shape = tuple(int(p) for p in re.split(r"[,x]", text.strip()))
    except ValueError:
        raise NdcError(f"bad --input-shape {text!r}: expected comma-separated sizes such as 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise NdcError(f"bad --input-shape {text!r}: expected positive sizes such as 1,3,32,32")
    return shape


def _import_file(path: Path):
    """The module of a user's ``file.py``, imported once per content (an edited file is imported afresh, also within
    one process, such as a notebook calling the library)."""
    name = f"_ndc_user_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    try:
        digest = sha256_file(path)
    except OSError:
        digest = None
    if name in sys.modules and getattr(sys.modules[name], "__ndc_sha256__", None) == digest:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NdcError(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    module.__ndc_sha256__ = digest
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise NdcError(f"{path} failed to import: {type(e).__name__}: {e}") from None
    return module


# ------------------------------------------------------------------ weights


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict safely: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise NdcError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = _pickle_kind(path)
        if kind == "module":
            raise NdcError(f"{path} holds a pickled module, not weights; load it as MODEL with --trust-pickle if you trust it") from None
        raise NdcError(f"{path} is truncated or corrupt: {first_line(e, 160)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NdcError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict into ``model``; mismatched keys or shapes are one clear line."""
    check_and_load_state_dict(model, read_state_dict(path), str(path))


def check_and_load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    state = _with_tied_keys(model, state)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        raise NdcError(f"weights {what} do not match the model: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise NdcError(f"weights {what} do not match the model: {k} has shape {list(state[k].shape)} in the file, the model expects {list(v.shape)}")
    model.load_state_dict(state, strict=True)


def _with_tied_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every key it lacks only because its tensor is tied to one it has (a language model's
    embedding and output layer share one Parameter; files keep one of the names)."""
    names: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        names.setdefault(id(v), []).append(k)
    state = dict(state)
    for tied in names.values():
        present = next((k for k in tied if k in state), None)
        if present is not None:
            for k in tied:
                state.setdefault(k, state[present])
    return state


# ------------------------------------------------------------- pickled modules


def _load_pickled_module(path: Path, trust_pickle: bool) -> nn.Module:
    if not path.exists():
        raise NdcError(f"{path}: no such file")
    if not path.is_file():
        raise NdcError(f"{path}: not a file")
    if not trust_pickle:
        kind = _pickle_kind(path)
        if kind == "weights":
            raise NdcError(
                f"{path} holds a state dict (weights only), not a model; give the architecture as "
                f"MODEL=file.py:factory (or package.module:factory) with --weights {path}"
            )
        if kind == "corrupt":
            raise NdcError(f"{path} is truncated or corrupt: not a readable torch.save file")
        raise NdcError(
            f"refusing to unpickle {path}: loading a pickled module can run arbitrary code. "
            "Pass --trust-pickle if you trust this file, or give MODEL=file.py:factory with --weights (state dict or .safetensors)"
        )
    working_folder_importable()  # its classes' modules, as python would find them
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise NdcError(f"{path} needs module {e.name!r} to unpickle its classes: run ndc from the folder that holds "
                       f"{e.name}.py, or add that folder to PYTHONPATH") from None
    except Exception as e:
        raise NdcError(f"{path} is truncated or corrupt: {first_line(e, 160)}") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise NdcError(
            f"{path} holds a state dict (weights only), not a model; give the architecture as "
            f"MODEL=file.py:factory (or package.module:factory) with --weights {path}"
        )
    raise NdcError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


def _pickle_kind(path: Path) -> str:
    """'weights', 'module' or 'corrupt', read from the pickle's opcodes without executing any."""
    try:
        refs = _pickle_globals(_pickle_bytes(path))
    except Exception:
        return "corrupt"
    return "weights" if all(_weights_only_global(m, n) for m, n in refs) else "module"


def _weights_only_global(module: str, name: str) -> bool:
    """Globals a plain state dict pickles: tensors, storages, dtypes, ordered dicts."""
    if module == "collections":
        return name == "OrderedDict"
    if module == "torch._utils":
        return name.startswith("_rebuild")
    if module == "torch":
        return name.endswith("Storage") or name in ("device", "Size") or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "_codecs":
        return name == "encode"
    return False


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not names:
                raise ValueError("no data.pkl")
            return z.read(names[0])
    data = path.read_bytes()
    if not data:
        raise ValueError("empty")
    # Legacy torch.save: several pickles in a row; the first is a magic number,
    # the third the object itself. Reading opcodes of all of them is enough.
    return data


def _pickle_globals(data: bytes) -> list[tuple[str, str]]:
    refs: list[tuple[str, str]] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        recent: list[object] = []
        memo: dict[int, object] = {}
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING"):
                recent.append(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(arg)))
            elif op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                refs.append((module, name))
            elif op.name == "STACK_GLOBAL":
                if len(recent) < 2:
                    raise ValueError("unreadable STACK_GLOBAL")
                refs.append((str(recent[-2]), str(recent[-1])))
            elif op.name == "STOP":
                break
        else:
            raise ValueError("pickle ended without STOP")
    if not refs and len(data) < 2:
        raise ValueError("not a pickle")
    return refs


# ------------------------------------------------------------------ helpers


def _sha(path: str | os.PathLike) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise NdcError(f"{path}: {e.strerror}") from None


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# -------------------------------------------------------------- what it reads


def guess_input_shape(model) -> tuple[int, ...] | None:
    """An input shape from the model itself: an ``input_shape`` attribute, or its first layer."""
    return input_shape_guess(model)[0]


def input_shape_guess(model) -> tuple[tuple[int, ...] | None, str | None]:
    """:func:`guess_input_shape` and, when part of it is invented rather than read from the model (a convolution
    says its channels, not the size of its images), what: ``"32x32"``."""
    declared = getattr(model, "input_shape", None)
    if isinstance(declared, (tuple, list)) and declared and all(isinstance(d, int) for d in declared):
        return tuple(declared), None
    config = getattr(model, "config", None)  # a Hugging Face model says what it reads
    if isinstance(getattr(config, "image_size", None), int) and isinstance(getattr(config, "num_channels", None), int):
        return (1, config.num_channels, config.image_size, config.image_size), None
    if _reads_token_ids(model):
        return (1, TOKENS), None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, 32, 32), "32x32"
        if isinstance(m, nn.Conv1d):
            return (1, m.in_channels, 128), "length 128"
        if isinstance(m, nn.Linear):
            return (1, m.in_features), None
    return None, None


TOKENS = 16  # sequence length traced when a language model's input shape is not given


def _reads_token_ids(model) -> bool:
    return getattr(model, "main_input_name", None) == "input_ids"


def input_spec(loaded, dtype: str | None):
    """What the input is: ``--input-dtype``, else what the file says (.pt2), else token ids for a Hugging Face LM."""
    from ndc.passes.inputs import FLOAT, integer_inputs

    if dtype is None:
        if loaded.inputs is not None:
            return loaded.inputs
        dtype = "int64" if _reads_token_ids(loaded.model) else "float32"
    if dtype == "float32":
        return FLOAT
    if loaded.inputs is not None and loaded.inputs.is_integer:
        return loaded.inputs
    return integer_inputs(loaded.model)
