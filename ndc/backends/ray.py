"""Units as Ray tasks, on a local Ray started (and shut down) by ndc or on a cluster (``--address``).

Each unit is one task asking for one CPU (and one GPU when it runs on CUDA):
with ``--engine fused`` that is one task per GPU shard, so the same run
spreads over a Ray cluster of GPU nodes. Tasks are retried if their worker
dies. Workers on a cluster must see the workspace at the same path (a shared
file system), because units read the teacher and the activation cache from it
and write their artefacts into it. When the driver goes, Ray cancels its
tasks; a task that is still running then is fenced by the workspace lock and
publishes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ndc.backends.base import Backend, largest_first
from ndc.distill.engine import Unit
from ndc.errors import NdcError

RETRIES = 2


def _run_remote(unit: Unit) -> list[dict]:
    import torch

    from ndc.distill.engine import run_unit

    torch.set_num_threads(1)
    if unit.device.startswith("cuda"):
        unit.device = "cuda"  # Ray makes the task's GPU the only one it sees
    return run_unit(unit)


class RayBackend(Backend):
    name = "ray"

    def __init__(self, workers: int = 1, address: str | None = None, devices: list[str] | None = None):
        self.slots, self.address = workers, address
        self.devices = devices or ["cpu"]

    def run(self, units: list[Unit], on_done: Callable[[dict], None], on_progress: Callable[[dict], None] | None = None) -> None:
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
                ray.init(num_cpus=self.slots, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
        try:
            pending = []
            for unit in largest_first(units):
                gpus = 1 if unit.device.startswith("cuda") else 0
                task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=False)(_run_remote)
                pending.append(task.remote(unit))
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        for metrics in ray.get(ref):
                            on_done(metrics)
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
        finally:
            if started_here:
                ray.shutdown()
