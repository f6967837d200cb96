"""Running ``kphi`` as a user does: in this process through ``kphi.cli.main``, in a subprocess where the process
boundary is the point, and runs killed with SIGKILL once a checkpoint is complete."""

import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

from kphi.cli import main


def kphi_env(extra=None) -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(extra or {})}


def run_torchrun(nproc: int, target: list[str], *, timeout: float = 180, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC TARGET`` on the loopback: the rendezvous binds a port the
    system chooses (no port picked here and freed for a race with another test's group), and the ranks meet at
    127.0.0.1 and talk over ``lo`` (gloo), not at whatever the machine's name resolves to.

    A group that has not finished in ``timeout`` seconds (a run here takes about 15) is stopped: each worker gets
    SIGABRT first, so Python's fault handler prints where every thread of every rank was, then the launcher and
    every worker are killed, so a hung rank never outlives the test. A hang is tried once more, with the first
    attempt's stacks given as a warning; a second hang fails the test with its stacks. A group that finishes,
    whatever its exit status, is returned as it is: only a hang is retried."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
               "--nproc_per_node", str(nproc), *target]
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1", **_loopback_for_gloo()}
    for attempt in (1, 2):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(command, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            err = _stop_hung_group(proc)
        if attempt == 1:
            warnings.warn(f"torchrun hung for {timeout} s; trying once more. Where its processes were:\n{err[-6000:]}")
    raise AssertionError(f"torchrun hung twice for {timeout} s. Where its processes were:\n{err[-6000:]}")


def _loopback_for_gloo() -> dict:
    """``GLOO_SOCKET_IFNAME`` naming the loopback interface where there is one called ``lo`` (Linux); else
    nothing, and gloo picks the interface of the machine's name."""
    import socket

    return {"GLOO_SOCKET_IFNAME": "lo"} if "lo" in {name for _, name in socket.if_nameindex()} else {}


def _stop_hung_group(proc: subprocess.Popen) -> str:
    """SIGABRT each worker of a hung torchrun, then the launcher if it has not exited by itself (Python's fault
    handler prints every thread's stack of each, so a hang before the workers start shows too), then SIGKILL
    whatever is left; returns the group's standard error. Each process is signalled by itself: torchrun starts
    every worker in a session of its own, so signalling the launcher's process group would leave the workers
    running, holding the output pipes open."""
    import psutil

    launcher = psutil.Process(proc.pid)
    workers = launcher.children(recursive=True)
    err = ""  # stays empty only if even SIGKILL's launcher does not exit within its wait
    # each step waits for the launcher to exit; the next escalates
    for targets, signum, wait in ((workers, signal.SIGABRT, 15), ([launcher], signal.SIGABRT, 15),
                                  ([launcher], signal.SIGKILL, 60)):
        _signal_all(targets, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            _, err = proc.communicate(timeout=wait)
            break
    _signal_all(workers, signal.SIGKILL)
    return err


def _signal_all(processes, signum: int) -> None:
    import psutil  # accelerate's dependency, so present wherever the tests run

    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def run_cli(*args, cache=None, input=None, timeout=900, env=None) -> subprocess.CompletedProcess:
    """``kphi ARGS`` as a user runs it, in this process: ``kphi.cli.main`` with standard input, output and error
    swapped for text buffers, offline, ``KPHI_CACHE`` set to ``cache`` and ``env`` added to the environment for
    the call only. The result reads like a finished subprocess: the exit status (argparse's ``SystemExit``
    included; an exception that escapes ``main`` is a traceback on standard error and status 1, as Python's
    own), the captured output. ``timeout`` is kept for the callers that also run it as a process."""
    extra = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
             **({"KPHI_CACHE": str(cache)} if cache is not None else {}), **(env or {})}
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with _environment(extra), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            _stdin(input or ""):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:  # noqa: BLE001 - what a process would print before exiting with status 1
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["kphi", *argv], code or 0, out.getvalue(), err.getvalue())


def run_kphi_process(*args, cache=None, input=None, timeout=900, env=None) -> subprocess.CompletedProcess:
    """``python -m kphi ARGS`` in a new process, for the tests where the process boundary is the point (start-up
    imports, exit by signal, launchers); otherwise as :func:`run_cli`."""
    extra = {**({"KPHI_CACHE": str(cache)} if cache is not None else {}), **(env or {})}
    return subprocess.run([sys.executable, "-m", "kphi", *map(str, args)], capture_output=True, text=True, input=input,
                          timeout=timeout, env=kphi_env(extra))


@contextlib.contextmanager
def _environment(values: dict):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({key: str(value) for key, value in values.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _stdin(text: str):
    saved, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def kill_after_checkpoint(args: list[str], out: Path, step: int, timeout: float = 300) -> None:
    """Run ``kphi ARGS`` and have it SIGKILL itself right after ``OUT/checkpoint-STEP`` is marked complete
    (``KPHI_TEST_KILL_AFTER_CHECKPOINT``): the kill lands at that step every time, never a step later."""
    from kphi.training.callbacks import KILL_AFTER_CHECKPOINT_VARIABLE

    proc = subprocess.run([sys.executable, "-m", "kphi", *args], capture_output=True, text=True, timeout=timeout,
                          env=kphi_env({KILL_AFTER_CHECKPOINT_VARIABLE: str(step)}))
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed at step {step}: {proc.stderr[-2000:]}"
    assert (out / f"checkpoint-{step}" / "kphi-complete.json").is_file() and not (out / "metrics.json").exists()
    steps = [int(p.name.removeprefix("checkpoint-")) for p in out.glob("checkpoint-*") if p.name[11:].isdigit()]
    assert max(steps) == step, f"checkpoints after the kill: {sorted(steps)}"


def finished_runs(root: Path) -> dict[str, int]:
    """``run directory (relative to root) -> mtime`` of every finished or diverged run under ``root``: what a
    rerun must leave untouched, and what tells which runs a rerun added (rather than counting log lines)."""
    return {str(p.parent.relative_to(root)): p.stat().st_mtime_ns
            for name in ("metrics.json", "diverged.json") for p in Path(root).rglob(name) if p.parent.name != "eval"}


def train_losses(run_dir: Path) -> dict[int, float]:
    """``step -> training loss`` from a run's ``log.csv``."""
    with open(run_dir / "log.csv") as handle:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(handle) if r["train_loss"]}
