"""Jobs on this machine: in this process (one worker) or in a pool of worker processes.

Each worker process runs one job at a time on one torch thread: on a CPU,
independent processes scale better than threads inside one process (two
torch threads in one process collapse when the other core is busy). Workers
never fork the parent, which may hold torch thread pools and locks: where the
platform has it they fork from a ``forkserver`` that has imported torch and
ndc once and done nothing else, so a worker starts in milliseconds instead of
importing torch again; elsewhere they are spawned. Each loads the teacher once.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ndc.backends.base import Backend, longest_first
from ndc.distill.config import Job


def _init_worker(progress_queue) -> None:
    import torch

    torch.set_num_threads(1)
    global _PROGRESS
    _PROGRESS = progress_queue


_PROGRESS = None


def _run_in_worker(job: Job) -> dict:
    from ndc.distill.job import run_job

    return run_job(job, _PROGRESS.put if _PROGRESS is not None else None)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = workers

    def run(self, jobs: list[Job], on_done: Callable[[dict], None], on_progress: Callable[[dict], None] | None = None) -> None:
        from ndc.distill.job import run_job

        jobs = longest_first(jobs)
        if self.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                on_done(run_job(job, on_progress))
            return
        ctx = _context()
        updates = ctx.Queue()
        try:
            stop = threading.Event()
            drain = threading.Thread(target=_drain, args=(updates, on_progress, stop), daemon=True)
            drain.start()
            try:
                with ProcessPoolExecutor(max_workers=min(self.workers, len(jobs)), mp_context=ctx,
                                         initializer=_init_worker, initargs=(updates,)) as pool:
                    pending = {pool.submit(_run_in_worker, job) for job in jobs}
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in finished:
                            on_done(future.result())
            finally:
                stop.set()
                drain.join(timeout=2)
        finally:
            updates.close()
            updates.join_thread()


def _context():
    """A forkserver that preloads torch and the job code where available, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "ndc.distill.job"])
        return ctx
    return mp.get_context("spawn")


def _drain(updates, on_progress, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            update = updates.get(timeout=0.2)
        except (queue.Empty, EOFError, OSError):
            continue
        if on_progress is not None:
            on_progress(update)
