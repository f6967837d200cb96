"""Running ``kphi`` as a user does: subprocesses, and runs killed with SIGKILL once a checkpoint is complete."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path


def kphi_env(extra=None) -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(extra or {})}


def free_port() -> int:
    """A TCP port nobody listens on now (for a test's process group), instead of a fixed one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_kphi(*args, cache=None, input=None, timeout=900, env=None) -> subprocess.CompletedProcess:
    """``python -m kphi ARGS`` as a user runs it: offline (no hub), output captured as text. ``cache`` isolates
    ``KPHI_CACHE`` (prepared data, tokenizers) in that folder; ``env`` adds variables; ``input`` is stdin."""
    extra = {**({"KPHI_CACHE": str(cache)} if cache is not None else {}), **(env or {})}
    return subprocess.run([sys.executable, "-m", "kphi", *map(str, args)], capture_output=True, text=True, input=input,
                          timeout=timeout, env=kphi_env(extra))


def kill_after_checkpoint(args: list[str], out: Path, step: int, timeout: float = 300) -> None:
    """Run ``kphi ARGS`` and have it SIGKILL itself right after ``OUT/checkpoint-STEP`` is marked complete
    (``KPHI_TEST_KILL_AFTER_CHECKPOINT``): the kill lands at that step every time, never a step later."""
    from kphi.callbacks import KILL_AFTER_CHECKPOINT_VARIABLE

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
