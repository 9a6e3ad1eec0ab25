"""Units on this machine: in this process (one slot) or in a pool of worker processes.

Each worker process runs one unit at a time (on a CPU, on one torch thread:
independent processes scale better than threads inside one process, since two
torch threads in one process collapse when the other core is busy). Workers
never fork the parent, which may hold torch thread pools and locks: where the
platform has it they fork from a ``forkserver`` that has imported torch and
ndc once and done nothing else, so a worker starts in milliseconds instead of
importing torch again; elsewhere they are spawned. Each loads the teacher once.

Workers die with the command that started them: on Linux the kernel kills a
worker when its parent (the forkserver, which exits when the command does)
dies, and every worker also watches the command's pid. Whatever slips
through is fenced by the workspace lock and publishes nothing.

A Ctrl-C (or any error) in the command stops the pool at once: units not
started are cancelled and running workers are terminated, never waited for.
That loses nothing finished: a candidate is published all or nothing, a
killed worker publishes nothing, and the next run redoes only what is not
finished.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ndc.backends.base import Backend, largest_first
from ndc.distill.engine import Unit
from ndc.errors import Terminated
from ndc.workspace import pid_alive

WATCH_SECONDS = 0.5
STOP_SECONDS = 3.0  # how long a terminated worker may take to go before it is killed
PR_SET_PDEATHSIG = 1


def _init_worker(progress_queue, command_pid: int) -> None:
    import torch

    torch.set_num_threads(1)
    die_with(command_pid)
    _thread_lock_for_tqdm()
    global _PROGRESS
    _PROGRESS = progress_queue


_PROGRESS = None


def _thread_lock_for_tqdm() -> None:
    """Keep tqdm from making a named semaphore in a worker.

    torch.fx makes a hidden tqdm bar while the teacher loads, and tqdm's first
    bar makes a cross-process lock: a named semaphore that a worker stopped by
    a Ctrl-C never removes, so the resource tracker warns of a "leaked
    semaphore" after the command's last line. A worker shows no bars; tqdm's
    thread lock is all it needs.
    """
    try:
        from tqdm.std import TqdmDefaultWriteLock
    except ImportError:
        return
    if not hasattr(TqdmDefaultWriteLock, "mp_lock"):
        TqdmDefaultWriteLock.mp_lock = None


def die_with(pid: int) -> None:
    """End this process when ``pid`` ends: a parent-death signal where Linux has one, and a watchdog thread."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    threading.Thread(target=_watch, args=(pid,), daemon=True, name="ndc-watchdog").start()


def _watch(pid: int) -> None:
    while pid_alive(pid):
        time.sleep(WATCH_SECONDS)
    os._exit(1)


def _run_in_worker(unit: Unit) -> list[dict]:
    from ndc.distill.engine import run_unit

    return run_unit(unit, _PROGRESS.put if _PROGRESS is not None else None)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, workers: int = 1, devices: list[str] | None = None):
        self.slots = workers
        self.devices = devices or ["cpu"]

    def run(self, units: list[Unit], on_done: Callable[[dict], None], on_progress: Callable[[dict], None] | None = None) -> None:
        from ndc.distill.engine import run_unit

        units = largest_first(units)
        if self.slots == 1 or len(units) <= 1:
            for unit in units:
                for metrics in run_unit(unit, on_progress):
                    on_done(metrics)
            return
        ctx = _context()
        updates = ctx.Queue()
        try:
            stop = threading.Event()
            drain = threading.Thread(target=_drain, args=(updates, on_progress, stop), daemon=True)
            drain.start()
            try:
                pool = ProcessPoolExecutor(max_workers=min(self.slots, len(units)), mp_context=ctx,
                                           initializer=_init_worker, initargs=(updates, os.getpid()))
                try:
                    with _interrupt_after():  # submit starts the workers: each is in pool._processes for _stop
                        pending = {pool.submit(_run_in_worker, unit) for unit in units}
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in finished:
                            for metrics in future.result():
                                on_done(metrics)
                except BaseException:
                    _stop(pool)
                    raise
                pool.shutdown(wait=True)
            finally:
                stop.set()
                drain.join(timeout=2)
        finally:
            updates.close()
            updates.join_thread()


STOPS = (signal.SIGINT, signal.SIGTERM)  # what stops a command: a Ctrl-C, and a SIGTERM (ndc.cli)


@contextlib.contextmanager
def _interrupt_after():
    """Hold a Ctrl-C (or SIGTERM) back until the block ends (in the main thread; elsewhere signals cannot arrive).

    A Ctrl-C while the pool starts a worker could land after the worker is
    forked but before the pool records it, and so escape :func:`_stop`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in STOPS}
    try:
        yield
    except Exception:
        if caught:  # what the Ctrl-C broke (a worker process dying as it started) is the Ctrl-C
            raise (Terminated() if caught[0] == signal.SIGTERM else KeyboardInterrupt()) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(caught[0])  # what it would have done: a SIGTERM ends a script (and a Ctrl-C)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the units not started and end the running workers now, not when their units finish.

    ``shutdown(wait=True)`` (what ``with`` does) would run every queued unit
    first, so a Ctrl-C would wait for the whole run. Workers get SIGTERM, then
    SIGKILL if they are still there after ``STOP_SECONDS``.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError, AssertionError):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1)


def _context():
    """A forkserver that preloads torch and the engine where available, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "ndc.distill.engine"])
        _start_forkserver()
        return ctx
    return mp.get_context("spawn")


def _start_forkserver() -> None:
    """Start the forkserver (if it is not running) ignoring Ctrl-C, which it and every worker it forks inherit.

    A terminal's Ctrl-C reaches the whole process group. It killed a forkserver
    still importing torch (a traceback, and "Aborted!" from the command) and
    interrupted workers mid-unit; the command stops its workers itself. The
    command's own Ctrl-C is blocked meanwhile (Linux keeps a blocked signal
    pending even while it is ignored), so it arrives when this returns.
    """
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    # (SIGTERM stays unblocked: the mask is inherited through exec, and a worker must die of _stop's terminate())
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through exec, unlike a handler
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _drain(updates, on_progress, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            update = updates.get(timeout=0.2)
        except (queue.Empty, EOFError, OSError):
            continue
        except ValueError:  # closed: the run is over (an interrupted one may not wait for this thread)
            return
        if on_progress is not None:
            on_progress(update)
