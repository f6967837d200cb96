"""Running ``kphi`` as a user does: subprocesses, and runs killed with SIGKILL once a checkpoint is complete."""

import csv
import os
import signal
import subprocess
import sys
import time
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
    """Start ``kphi ARGS``, SIGKILL it as soon as ``OUT/checkpoint-STEP`` is marked complete."""
    proc = subprocess.Popen([sys.executable, "-m", "kphi", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=kphi_env())
    deadline = time.time() + timeout
    while time.time() < deadline and not (out / f"checkpoint-{step}" / "kphi-complete.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"


def train_losses(run_dir: Path) -> dict[int, float]:
    """``step -> training loss`` from a run's ``log.csv``."""
    with open(run_dir / "log.csv") as handle:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(handle) if r["train_loss"]}
