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
from ndc.errors import NdcError, first_line

RETRIES = 2
CONNECT_TIMEOUT = 10.0  # seconds to reach --address before saying it cannot be reached


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """One line when nothing answers at ``--address`` (``host:port`` or ``ray://host:port``; ``auto`` is Ray's to find)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        if address != "auto":
            raise NdcError(f"bad --address {address!r}: give HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379), "
                           "ray://HOST:PORT or auto")
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise NdcError(f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__} after at most "
                       f"{timeout:g}s): is `ray start --head` running there, and the port open?") from None


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
        if address:
            _check_reachable(address)  # before any work: Ray itself retries an unreachable address for minutes

    def run(self, units: list[Unit], on_done: Callable[[dict], None], on_progress: Callable[[dict], None] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise NdcError("--backend ray needs Ray: pip install 'ndc[ray]'") from None
        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                try:
                    ray.init(address=self.address, log_to_driver=False)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise NdcError(f"cannot join the Ray cluster at {self.address}: {first_line(e, 200)}") from None
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
