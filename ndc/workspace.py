"""The workspace: a directory holding every stage's artefacts.

Rules every stage follows:

* nothing is pickled into a workspace: tensors are safetensors, everything
  else JSON or text;
* every write is atomic (a temporary file in the same folder, fsync, rename),
  so a killed run never leaves a half-written artefact behind;
* paths recorded in a workspace are relative and never leave it;
* ``manifest.json`` records the sha256 of each artefact and what it was made
  from, so a stage can skip work that is up to date and notice a corrupt file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ndc.errors import NdcError, one_line

MANIFEST = "manifest.json"
PLAN = "plan.json"
TEACHER_WEIGHTS = "teacher.safetensors"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Write to a temporary file beside ``path``; rename over it only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically. Tensors are made contiguous CPU copies."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path, "wb") as f:
        f.write(data)


def load_tensors(path: str | os.PathLike) -> dict:
    """Load a safetensors file; a missing or corrupt file is one clear :class:`NdcError`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise NdcError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad header
        raise NdcError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NdcError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NdcError(f"{path}: corrupt JSON ({one_line(e)})") from None


class Workspace:
    """A directory of artefacts. ``Workspace(root).path('a/b')`` never leaves ``root``.

    >>> ws = Workspace("ndc-work")           # doctest: +SKIP
    >>> ws.write_json("plan.json", {...})    # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
    def path(self, rel: str | os.PathLike) -> Path:
        """Absolute path of ``rel`` inside the workspace; refuses paths that escape it."""
        rel = Path(rel)
        if rel.is_absolute():
            raise NdcError(f"workspace path {str(rel)!r} must be relative")
        full = (self.root / rel).resolve()
        if full != self.root and self.root not in full.parents:
            raise NdcError(f"workspace path {str(rel)!r} escapes the workspace {self.root}")
        return full

    def exists(self, rel: str | os.PathLike) -> bool:
        return self.path(rel).exists()

    def ensure(self) -> "Workspace":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NdcError(f"workspace {self.root} exists and is not a directory") from None
        return self

    # --------------------------------------------------------------- artefacts
    def write_text(self, rel: str, text: str) -> Path:
        p = self.path(rel)
        write_text_atomic(p, text)
        return p

    def write_json(self, rel: str, obj: Any) -> Path:
        p = self.path(rel)
        write_json_atomic(p, obj)
        return p

    def read_json(self, rel: str) -> Any:
        return read_json(self.path(rel))

    def save_tensors(self, rel: str, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
        p = self.path(rel)
        save_tensors_atomic(p, tensors, metadata)
        return p

    def load_tensors(self, rel: str) -> dict:
        return load_tensors(self.path(rel))

    # ---------------------------------------------------------------- manifest
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.ensure()
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def manifest(self) -> dict:
        p = self.root / MANIFEST
        if not p.exists():
            return {"artefacts": {}}
        try:
            m = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            # A corrupt manifest only costs redoing work: every artefact is re-verified.
            return {"artefacts": {}}
        m.setdefault("artefacts", {})
        return m

    def update_manifest(self, change) -> None:
        """Apply ``change(manifest)`` under a lock and write the manifest back atomically."""
        with self._locked():
            m = self.manifest()
            change(m)
            write_json_atomic(self.root / MANIFEST, m)

    def record(self, rel: str, made_from: dict | None = None, **extra: Any) -> str:
        """Record ``rel``'s sha256 (and what made it) in the manifest; returns the hash."""
        digest = sha256_file(self.path(rel))
        self.update_manifest(lambda m: m["artefacts"].__setitem__(str(rel), {"sha256": digest, "made_from": made_from or {}, **extra}))
        return digest

    def verified(self, rel: str, made_from: dict | None = None) -> bool:
        """True when ``rel`` exists, matches its recorded hash, and was made from ``made_from``."""
        entry = self.manifest()["artefacts"].get(str(rel))
        p = self.path(rel)
        if entry is None or not p.is_file():
            return False
        if made_from is not None and entry.get("made_from") != made_from:
            return False
        return sha256_file(p) == entry["sha256"]

    # -------------------------------------------------------------------- plan
    def load_plan(self):
        from ndc.ir import Plan

        p = self.path(PLAN)
        if not p.is_file():
            raise NdcError(f"no plan in workspace {self.root}; run `ndc partition MODEL -w {self.root}` first")
        return Plan.from_json(read_json(p))
