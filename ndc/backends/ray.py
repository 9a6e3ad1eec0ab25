"""Jobs as Ray tasks, on a local Ray started (and shut down) by ndc or on a cluster (``--address``).

Each job is one task asking for one CPU (and one GPU with ``--device cuda``),
retried if its worker dies. Workers on a cluster must see the workspace at
the same path (a shared file system), because jobs read the teacher and the
activation cache from it and write their artefacts into it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ndc.backends.base import Backend, longest_first
from ndc.distill.config import Job
from ndc.errors import NdcError

RETRIES = 2


def _run_remote(job: Job) -> dict:
    import torch

    from ndc.distill.job import run_job

    torch.set_num_threads(1)
    return run_job(job)


class RayBackend(Backend):
    name = "ray"

    def __init__(self, workers: int = 1, address: str | None = None, device: str = "cpu"):
        self.workers, self.address, self.device = workers, address, device

    def run(self, jobs: list[Job], on_done: Callable[[dict], None], on_progress: Callable[[dict], None] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise NdcError("--backend ray needs Ray: pip install 'ndc[ray]'") from None
        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                # A throwaway local cluster: no auth token written to the home folder.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
        try:
            gpus = 1 if self.device.startswith("cuda") else 0
            task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=False)(_run_remote)
            pending = [task.remote(job) for job in longest_first(jobs)]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    on_done(ray.get(ref))
        finally:
            if started_here:
                ray.shutdown()
