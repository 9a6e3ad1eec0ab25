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
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ndc.errors import NdcError, one_line

MANIFEST = "manifest.json"
PLAN = "plan.json"
TEACHER_WEIGHTS = "teacher.safetensors"
LOCK = ".ndc-lock"  # the workspace lock: flock'ed by the command that writes, JSON inside says who
TEMPORARY_GLOB = ".*.tmp*"  # what atomic_write and export leave behind when they are killed


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
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.filename is None:  # a failed write names no file: name the artefact
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
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
            m = None
        if not isinstance(m, dict) or not isinstance(m.get("artefacts", {}), dict):
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

    # -------------------------------------------------------------------- lock
    @contextlib.contextmanager
    def writing(self, command: str | None = None, create: bool = False) -> Iterator[str | None]:
        """Hold the workspace for writing (exclusive, advisory); yields the token that fences this command's workers.

        A second writer, or a writer while a reader holds it, gets one
        :class:`WorkspaceBusy` line naming the holder. The lock dies with its
        process, so a killed command never leaves a stale lock. On entry, the
        temporary files of killed writes are removed. Only a command that
        starts a workspace (``create``) may find none there.
        """
        if not create and not self.root.is_dir():
            raise NdcError(f"no plan in workspace {self.root}; run `ndc partition MODEL -w {self.root}` first")
        self.ensure()
        full = command_line()  # the user's command line when this process is that command (``ndc distill --width 0.5``)
        with _hold(self.root, "write", full if command is None or full.startswith(command) else command) as held:
            if held.count == 1:
                remove_temporaries(self.root)
            yield held.token

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the workspace shared: writers wait for readers that need a consistent view, and the other way round."""
        if not self.root.is_dir():
            yield
            return
        with _hold(self.root, "read", command_line()):
            yield

    # -------------------------------------------------------------------- plan
    def load_plan(self):
        from ndc.ir import Plan

        p = self.path(PLAN)
        if not p.is_file():
            raise NdcError(f"no plan in workspace {self.root}; run `ndc partition MODEL -w {self.root}` first")
        doc = read_json(p)
        if not isinstance(doc, dict):
            raise NdcError(f"{p} is not a plan (a JSON {type(doc).__name__}); rerun ndc partition")
        return Plan.from_json(doc)


# -------------------------------------------------------------------- lock


class WorkspaceBusy(NdcError):
    """Another command holds the workspace lock."""


@dataclass
class _Holding:
    fd: int
    mode: str  # "write" or "read"
    count: int
    token: str | None


_HELD: dict[Path, _Holding] = {}  # per process: flock conflicts between two descriptors of one process too


def _lock_fd(root: Path, mode: str = "write") -> int | None:
    """The lock file, opened; for a reader of a workspace it cannot write (a read-only mount, another user's
    folder) the file read-only, or None when there is none: then no one can be writing either."""
    try:
        return os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if mode != "read" or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    try:
        return os.open(root / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None


def lock_holder(root: Path) -> dict:
    """What the lock file says about the command that last took the workspace for writing."""
    try:
        info = json.loads((root / LOCK).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _busy(root: Path, wanted: str) -> WorkspaceBusy:
    readers_only = False
    if wanted == "write":
        probe = os.open(root / LOCK, os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            readers_only = True
        except BlockingIOError:
            pass
        finally:
            os.close(probe)
    if readers_only:
        return WorkspaceBusy(f"workspace {root} is being read by another ndc command; run this one when it has finished")
    info = lock_holder(root)
    who = f"`{info.get('command', 'ndc')}` (pid {info.get('pid', '?')}"
    who += f" on {info['host']})" if info.get("host") not in (None, socket.gethostname()) else ")"
    since = f" since {time.strftime('%H:%M:%S', time.localtime(info['since']))}" if info.get("since") else ""
    return WorkspaceBusy(f"workspace {root} is in use by {who}{since}; wait for it to finish or stop it, "
                         "then run this command again")


@contextlib.contextmanager
def _hold(root: Path, mode: str, command: str) -> Iterator[_Holding]:
    held = _HELD.get(root)
    if held is not None:  # nested stages of one command (ndc demo): the outer hold covers them
        if mode == "write" and held.mode == "read":
            try:
                fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(root, mode) from None
            held.mode, held.token = "write", _announce(root, held.fd, command)
        held.count += 1
        try:
            yield held
        finally:
            held.count -= 1
        return
    fd = _lock_fd(root, mode)
    if fd is None:  # a reader of a workspace nobody can write to
        yield _Holding(-1, mode, 1, None)
        return
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if mode == "write" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(root, mode) from None
    held = _HELD[root] = _Holding(fd, mode, 1, _announce(root, fd, command) if mode == "write" else None)
    try:
        yield held
    finally:
        del _HELD[root]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _announce(root: Path, fd: int, command: str) -> str:
    """Write who holds the lock into it; the token fences workers of this command from later ones."""
    token = secrets.token_hex(8)
    info = {"pid": os.getpid(), "command": command, "host": socket.gethostname(), "since": time.time(), "token": token}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return token


def fence_holds(root: str | os.PathLike, token: str | None) -> bool:
    """True while the command that issued ``token`` still holds the workspace for writing.

    Workers call this before they publish an artefact: once their command is
    gone (killed, or replaced by a later one) they must not write. No token
    (a library caller that took no lock) always holds.
    """
    if token is None:
        return True
    root = Path(root)
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return lock_holder(root).get("token") == token  # a writer holds it: ours?
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False  # nobody writes: the command that started us is gone
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def remove_temporaries(folder: Path) -> int:
    """Delete what killed atomic writes left in ``folder`` (recursively); returns how many files."""
    removed = 0
    for stale in folder.rglob(TEMPORARY_GLOB):
        if stale.is_file() and stale.name != LOCK:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed += 1
    return removed


def command_line() -> str:
    """``ndc distill --width 0.5`` for the lock file and messages."""
    args = [os.path.basename(sys.argv[0])] + sys.argv[1:] if sys.argv and sys.argv[0] else ["ndc"]
    if args[0] in ("__main__.py", "-m", "-c", "python", "python3"):
        args[0] = "ndc"
    return " ".join(args[:4]) + (" ..." if len(args) > 4 else "")
