"""The job store: every job artefact's path, hashes, reads and writes, in one place.

A candidate's artefacts live in ``jobs/<neighbourhood>/<spec>/``::

    weights.safetensors   the student's state dict
    student.json          spec + rewrite record: rebuilds the architecture
    metrics.json          key, status, errors, sizes, history, and the sha256 of the two files above

A candidate is *finished* for a key when its ``metrics.json`` says ``done``
for that key and both hashes still match. Engines, ``stitch`` and ``search``
all ask the store; nobody else builds these paths.

Publishing is all or nothing: the three files are written into a staging
folder beside the candidate's, which then replaces it with two renames, so a
finished result is never half replaced. A run that fails, or is killed, or
whose command is gone (the workspace-lock fence) leaves the earlier result in
place: ``--force`` keeps the old student until the new one succeeds.
A long run's checkpoint (``.<spec>.checkpoint.safetensors`` beside the folder)
survives the swap until its candidate is published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.workspace import (Workspace, fence_holds, load_tensors, read_json, save_tensors_atomic, sha256_file,
                           write_json_atomic)

METRICS, WEIGHTS, STUDENT, FAILURE = "metrics.json", "weights.safetensors", "student.json", "failure.json"
JOBS_DIR = "jobs"
NAME_LIMIT = 80  # bytes of a readable folder name; longer names get a prefix and a hash (file systems stop at 255)


def folder_name(name: str) -> str:
    """A neighbourhood name as one short, unique path component.

    >>> folder_name("layer1.0")
    'layer1.0'
    >>> len(folder_name("encoder." * 60)) <= NAME_LIMIT
    True
    """
    cleaned = "".join(c if c.isalnum() or c in "._-~+" else "_" for c in name)
    if cleaned == name and cleaned.strip(".") and not cleaned.startswith(".") and len(cleaned.encode()) <= NAME_LIMIT:
        return cleaned
    # Lossy, hidden or long: a readable prefix, made unique by a hash of the full name.
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    prefix = cleaned.lstrip(".").encode()[: NAME_LIMIT - len(digest) - 1].decode(errors="ignore")
    return f"{prefix}-{digest}" if prefix else digest


def data_files(data) -> object:
    """The identity of ``data``'s files (None for none) as each candidate's ``metrics.json`` records it."""
    return None if data is None else json.loads(json.dumps(getattr(data, "fingerprint", None)))


def from_other_files(metrics: dict | None, files: object) -> bool:
    """Whether a finished candidate (its ``metrics``) was distilled from other files than ``files``."""
    return metrics is not None and metrics.get("data_files") not in (None, files)


class StaleStudent(NdcError):
    """A finished candidate distilled from another teacher or partition than the workspace's now."""


class Fenced(Exception):
    """The command that started this work no longer holds the workspace: nothing may be written."""


class JobStore:
    """Artefacts of every candidate of one workspace."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    # ------------------------------------------------------------------ paths
    def folder(self, neighbourhood: str, spec: Spec) -> str:
        return f"{JOBS_DIR}/{folder_name(neighbourhood)}/{spec.slug()}"

    def checkpoint(self, neighbourhood: str, spec: Spec) -> str:
        return f"{JOBS_DIR}/{folder_name(neighbourhood)}/.{spec.slug()}.checkpoint.safetensors"

    # ------------------------------------------------------------------ reads
    def metrics(self, neighbourhood: str, spec: Spec) -> dict | None:
        """The candidate's ``metrics.json`` when it is a readable JSON object, else None."""
        path = self.ws.path(f"{self.folder(neighbourhood, spec)}/{METRICS}")
        if not path.is_file():
            return None
        try:
            doc = read_json(path)
        except NdcError:
            return None
        return doc if isinstance(doc, dict) else None

    def weights_sha(self, neighbourhood: str, spec: Spec) -> str | None:
        """The sha256 of the candidate's weights as its ``metrics.json`` records it (None: no candidate)."""
        return (self.metrics(neighbourhood, spec) or {}).get("weights_sha256")

    def finished(self, neighbourhood: str, spec: Spec, key: str | None = None) -> dict | None:
        """The metrics of a finished candidate (for ``key``, or any key) whose files verify, else None."""
        metrics = self.metrics(neighbourhood, spec)
        if metrics is None or metrics.get("status") != "done" or (key is not None and metrics.get("key") != key):
            return None
        folder = self.folder(neighbourhood, spec)
        for name, field in ((WEIGHTS, "weights_sha256"), (STUDENT, "student_sha256")):
            p = self.ws.path(f"{folder}/{name}")
            if not p.is_file() or sha256_file(p) != metrics.get(field):
                return None
        return metrics

    def load(self, neighbourhood: str, spec: Spec, made_for: str | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
        """``(record, state_dict, metrics)`` of a finished candidate; one clear line when there is none.

        ``made_for`` (see :func:`ndc.distill.config.made_for`): the teacher and
        neighbourhood the candidate must have been distilled from; a candidate
        that recorded others raises :class:`StaleStudent` (candidates from before
        ndc recorded it are taken as they are).
        """
        folder = self.folder(neighbourhood, spec)
        metrics = self.metrics(neighbourhood, spec)
        if metrics is None:
            raise NdcError(f"no trained student for {neighbourhood} {spec}; run ndc distill --spec {spec} (or choose another spec)")
        if metrics.get("status") != "done":
            raise NdcError(f"the job for {neighbourhood} {spec} did not finish ({metrics.get('error', metrics.get('status'))}); "
                           "rerun ndc distill")
        if self.finished(neighbourhood, spec) is None:
            raise NdcError(f"the student files of {neighbourhood} {spec} do not verify (corrupt or changed); "
                           f"rerun ndc distill --force --only {neighbourhood}")
        if made_for is not None and metrics.get("made_for") not in (None, made_for):
            raise StaleStudent(f"the student of {neighbourhood} {spec} was distilled from another teacher or partition "
                               f"than the workspace's now; rerun ndc distill --spec {spec} (it retrains exactly those)")
        info = read_json(self.ws.path(f"{folder}/{STUDENT}"))
        if not isinstance(info, dict) or "record" not in info:
            raise NdcError(f"{self.ws.path(f'{folder}/{STUDENT}')}: not a student record; rerun ndc distill --force --only {neighbourhood}")
        return info["record"], load_tensors(self.ws.path(f"{folder}/{WEIGHTS}")), metrics

    def trained(self) -> dict[str, list[Spec]]:
        """Specs with a finished student, per neighbourhood name (from the folders themselves)."""
        out: dict[str, set[Spec]] = {}
        root = self.ws.path(JOBS_DIR)
        for path in sorted(root.glob(f"*/*/{METRICS}")) if root.is_dir() else []:
            try:
                doc = json.loads(path.read_text())
                name, spec = doc["neighbourhood"], Spec.parse(doc["spec"])
            except (OSError, ValueError, KeyError, TypeError, NdcError):
                continue
            if self.folder(name, spec) == str(path.parent.relative_to(self.ws.root)) and self.finished(name, spec):
                out.setdefault(name, set()).add(spec)
        return {k: sorted(v) for k, v in out.items()}

    # ----------------------------------------------------------------- writes
    def publish(self, neighbourhood: str, spec: Spec, state: dict[str, torch.Tensor], student: dict, metrics: dict,
                fence: str | None = None) -> dict:
        """Write a finished candidate (all three files, or nothing); returns the metrics as written.

        Raises :class:`Fenced` (writing nothing) when the command holding
        ``fence`` is gone.
        """
        final = self.ws.path(self.folder(neighbourhood, spec))
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
        try:
            # No safetensors metadata: its entries come out in random order, and the same
            # job must give byte-identical files (the key is in metrics.json).
            save_tensors_atomic(staging / WEIGHTS, state)
            write_json_atomic(staging / STUDENT, student)
            metrics = {**metrics, "weights_sha256": sha256_file(staging / WEIGHTS),
                       "student_sha256": sha256_file(staging / STUDENT)}
            write_json_atomic(staging / METRICS, metrics)
            if not fence_holds(self.ws.root, fence):
                raise Fenced(f"{neighbourhood} {spec}")
            old = None
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                os.rename(final, old / "x")
            os.rename(staging, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with contextlib.suppress(FileNotFoundError):
            self.ws.path(self.checkpoint(neighbourhood, spec)).unlink()
        return metrics

    def fail(self, neighbourhood: str, spec: Spec, metrics: dict, fence: str | None = None) -> dict:
        """Record a failed run. A finished student already there is kept: the failure goes beside it."""
        if not fence_holds(self.ws.root, fence):
            raise Fenced(f"{neighbourhood} {spec}")
        folder = self.folder(neighbourhood, spec)
        kept = self.finished(neighbourhood, spec)
        if kept is not None:
            self.ws.write_json(f"{folder}/{FAILURE}", metrics)
            return {**metrics, "kept": kept.get("key")}
        self.ws.write_json(f"{folder}/{METRICS}", metrics)
        return metrics

    def recover(self) -> None:
        """Finish or undo what a killed publish left (call while holding the workspace for writing)."""
        root = self.ws.path(JOBS_DIR)
        if not root.is_dir():
            return
        for parent in root.iterdir():
            if not parent.is_dir():
                continue
            for entry in parent.iterdir():
                if not entry.is_dir() or not entry.name.startswith("."):
                    continue
                if ".old-" in entry.name:
                    target = parent / entry.name[1:].split(".old-")[0]
                    if not target.exists() and (entry / "x").is_dir():
                        os.rename(entry / "x", target)  # killed between the two renames: put the old result back
                shutil.rmtree(entry, ignore_errors=True)
