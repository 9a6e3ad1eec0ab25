"""Ctrl-C (or SIGTERM) stops ``ndc distill --workers N`` at once, leaves no worker behind, and the rerun resumes.

A SIGINT to the command (not to its whole process group, as a terminal's
Ctrl-C would send) used to wait until every queued unit had finished: the
process pool's ``shutdown(wait=True)`` ran them all first.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from ndc.backends.local import LocalBackend
from tests.conftest import descendants, running

HERE = pathlib.Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
CANDIDATES = 3  # one neighbourhood, three widths, one unit each (jobs engine): two run, one waits
ARGS = ["distill", "--only", "layer1.0", "--width", "0.25,0.5,0.75", "--data-free", "--steps", "150", "--batch-size", "32",
        "--val-size", "64", "--workers", "2", "--format", "json", "--quiet"]


def _published(ws: pathlib.Path) -> dict[pathlib.Path, int]:
    done = {}
    for path in ws.glob("jobs/*/*/metrics.json"):
        try:
            if json.loads(path.read_text()).get("status") == "done":
                done[path] = path.stat().st_mtime_ns
        except (OSError, ValueError):
            continue
    return done


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's background job ignores SIGINT; the command must not


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_stops_the_workers_at_once_and_the_rerun_skips_what_finished(ws, signum, status, said):
    # SIGTERM (kill, a scheduler) killed the command alone: no message, and the resource tracker's "leaked semaphore"
    command = [sys.executable, "-m", "ndc", *ARGS, "-w", str(ws)]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # noqa: PLW1509 (it only resets one signal)
    try:
        deadline = time.time() + 120
        published: dict[pathlib.Path, int] = {}
        while time.time() < deadline and proc.poll() is None and not published:
            published = _published(ws)
            time.sleep(0.05)
        assert proc.poll() is None and published, "the run should have published a candidate and still be running"
        children = descendants(proc.pid)
        assert len(children) >= 4, "forkserver, resource tracker and two workers should be running"
        proc.send_signal(signum)  # the command's process only: its workers see no signal
        sent = time.time()
        _, stderr = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, stderr
    assert f"{said}; finished artefacts are kept, run the command again to resume" in stderr
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    assert took < 10, f"the command took {took:.1f}s to stop after {signum.name}"
    after = _published(ws)
    assert len(after) < CANDIDATES, "the queued units should have been cancelled, not run"
    deadline = time.time() + 10
    while time.time() < deadline and any(running(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if running(p)], "workers outlived the interrupted command"
    if signum == signal.SIGTERM:
        return  # the rerun is the same as after a Ctrl-C

    rerun = subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = json.loads(rerun.stdout)["candidates"]
    assert len(rows) == CANDIDATES and all(r["status"] in ("done", "skipped") for r in rows)
    assert sum(r["status"] == "skipped" for r in rows) == len(after)
    for path, mtime in after.items():
        assert path.stat().st_mtime_ns == mtime  # finished candidates were not redone


def _own_group_default_sigint() -> None:
    os.setpgrp()  # a terminal's Ctrl-C goes to the whole group: the command, its forkserver and its workers
    _default_sigint()


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="finds the forkserver through /proc")
def test_a_terminal_ctrl_c_while_the_workers_start_is_a_clean_interrupt(ws):
    # the forkserver, still importing torch, died of the Ctrl-C with a traceback, and the command said
    # "Aborted!" with exit status 1
    proc = subprocess.Popen([sys.executable, "-m", "ndc", *ARGS, "-w", str(ws)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_own_group_default_sigint)  # noqa: PLW1509
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any("forkserver" in _cmdline(p) for p in descendants(proc.pid)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the command ended before it started its workers"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted; finished artefacts are kept" in stderr and "Traceback" not in stderr, stderr


def test_an_error_that_a_ctrl_c_caused_while_workers_start_is_the_ctrl_c():
    from ndc.backends.local import _interrupt_after

    with pytest.raises(KeyboardInterrupt):
        with _interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs: the Ctrl-C is held back
            raise EOFError("the forkserver went away")


def test_a_sigterm_held_back_outside_the_cli_still_ends_the_script():
    # (the default SIGTERM handler is no function to call: a held-back SIGTERM was dropped and the script went on)
    code = ("import os, signal, time\n"
            "from ndc.backends.local import _interrupt_after\n"
            "with _interrupt_after():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.2)\n"
            "print('went on')\n")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == -signal.SIGTERM and "went on" not in r.stdout, (r.returncode, r.stdout, r.stderr)


@dataclass
class _Item:
    neighbourhood: str
    spec: str = "width=0.5"


@dataclass
class _Unit:
    cost: float
    items: list
    folder: str


def _fail_or_sleep(unit: _Unit) -> list[dict]:
    """Stands in for a unit in a worker: the cheapest fails once the others run, which would take a minute."""
    folder = pathlib.Path(unit.folder)
    if unit.cost != 1:
        (folder / f"{unit.cost}.pid").write_text(str(os.getpid()))
        time.sleep(60)
        return []
    deadline = time.time() + 30
    while time.time() < deadline and len(list(folder.glob("*.pid"))) < 2:
        time.sleep(0.05)
    raise ValueError("this unit is broken")


def test_a_unit_that_raises_stops_the_other_workers_and_its_error_reaches_the_caller(monkeypatch, tmp_path):
    from ndc.backends import local

    monkeypatch.setattr(local, "_run_in_worker", _fail_or_sleep)
    units = [_Unit(cost, [_Item(f"n{cost}")], str(tmp_path)) for cost in (3, 2, 1)]
    started = time.time()
    with pytest.raises(ValueError, match="this unit is broken"):
        LocalBackend(workers=3).run(units, on_done=lambda metrics: None)
    assert time.time() - started < 40, "the other units should have been stopped, not waited for"
    workers = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(workers) == 2
    assert not [p for p in workers if running(p)], "the workers of the other units should have been ended"
