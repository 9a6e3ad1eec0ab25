"""The one small interface every backend implements.

A backend takes independent :class:`~ndc.distill.config.Job` s and runs
:func:`ndc.distill.job.run_job` on each, calling ``on_done(metrics)`` as each
finishes and ``on_progress(update)`` for progress within a job when it can.
Jobs are plain data and ``run_job`` is deterministic given the job, so every
backend produces the same artefacts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from ndc.distill.config import Job
from ndc.errors import NdcError

BACKENDS = ("local", "ray")


class Backend(ABC):
    name: str

    @abstractmethod
    def run(self, jobs: list[Job], on_done: Callable[[dict], None], on_progress: Callable[[dict], None] | None = None) -> None:
        """Run every job (longest first); return when all have finished."""


def longest_first(jobs: list[Job]) -> list[Job]:
    return sorted(jobs, key=lambda j: (-j.cost, j.neighbourhood, j.spec))


def make_backend(name: str, workers: int = 1, address: str | None = None, device: str = "cpu") -> Backend:
    if workers < 1:
        raise NdcError("--workers must be at least 1")
    if name == "local":
        if address:
            raise NdcError("--address goes with --backend ray")
        from ndc.backends.local import LocalBackend

        return LocalBackend(workers)
    if name == "ray":
        from ndc.backends.ray import RayBackend

        return RayBackend(workers, address, device)
    raise NdcError(f"unknown --backend {name!r}; valid backends: {', '.join(BACKENDS)}")
