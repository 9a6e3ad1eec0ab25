"""The one small interface every backend implements: place units of work.

A backend takes :class:`~ndc.distill.engine.Unit` s (one candidate each for
the ``jobs`` engine, one shard per device or worker for ``fused``) and runs
:func:`ndc.distill.engine.run_unit` on each, calling ``on_done(metrics)`` for
every candidate as its unit returns and ``on_progress(update)`` for progress
within a unit when it can. Units are plain data and ``run_unit`` is
deterministic given the unit, so every backend produces the same artefacts.

``slots`` is how many units run at once, ``devices`` where they run (a unit
names its device; with several GPUs, units are spread over them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from ndc.errors import NdcError

if TYPE_CHECKING:
    from ndc.distill.engine import Unit

BACKENDS = ("local", "ray")


class Backend(ABC):
    name: str
    slots: int
    devices: list[str]

    @abstractmethod
    def run(self, units: list["Unit"], on_done: Callable[[dict], None], on_progress: Callable[[dict], None] | None = None) -> None:
        """Run every unit (largest first); return when all have finished."""


def largest_first(units: list["Unit"]) -> list["Unit"]:
    return sorted(units, key=lambda u: (-u.cost, u.items[0].neighbourhood, u.items[0].spec))


def resolve_devices(device: str, devices: str | None = None) -> list[str]:
    """``--device cuda`` -> every visible GPU (or those of ``--devices 0,2``); ``cpu`` -> ``["cpu"]``."""
    import torch

    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise NdcError(f"unknown --device {device!r}; valid: cpu, cuda, cuda:N")
    if kind == "cpu":
        if devices:
            raise NdcError("--devices picks GPUs; it goes with --device cuda")
        return ["cpu"]
    if not torch.cuda.is_available():
        raise NdcError(f"--device {device}: no CUDA GPU is visible to this torch ({torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if devices:
        try:
            wanted = [int(d) for d in devices.split(",") if d.strip()]
        except ValueError:
            raise NdcError(f"bad --devices {devices!r}: expected GPU numbers such as 0,2") from None
    elif ":" in device:
        wanted = [int(device.split(":")[1])]
    else:
        wanted = list(range(count))
    bad = [d for d in wanted if not 0 <= d < count]
    if bad or not wanted:
        raise NdcError(f"--devices {devices or device}: this machine has {count} GPU(s), numbered 0 to {count - 1}")
    return [f"cuda:{d}" for d in wanted]


def make_backend(name: str, workers: int = 1, address: str | None = None, devices: list[str] | None = None) -> Backend:
    if workers < 1:
        raise NdcError("--workers must be at least 1")
    devices = devices or ["cpu"]
    if name == "local":
        if address:
            raise NdcError("--address goes with --backend ray")
        from ndc.backends.local import LocalBackend

        return LocalBackend(workers, devices)
    if name == "ray":
        from ndc.backends.ray import RayBackend

        return RayBackend(workers, address, devices)
    raise NdcError(f"unknown --backend {name!r}; valid backends: {', '.join(BACKENDS)}")
