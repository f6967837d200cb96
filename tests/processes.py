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
