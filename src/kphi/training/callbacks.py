"""Trainer callbacks for kphi runs: CSV log with tokens/s, divergence guard, time limit, complete checkpoints.

Each one is a small `transformers.TrainerCallback`; the training loop itself is `transformers.Trainer`'s.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from ..files import atomic_write_text

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointMarker",
    "CsvLogger",
    "DivergenceGuard",
    "ProgressLine",
    "StepsBegun",
    "TimeLimit",
    "is_complete_checkpoint",
]

#: File written into ``checkpoint-N/`` once everything else in it has been written.
COMPLETE_MARKER = "kphi-complete.json"

#: Test hook: with ``KPHI_TEST_KILL_AFTER_CHECKPOINT=N`` in its environment a run SIGKILLs itself the moment
#: ``checkpoint-N`` is marked complete: a kill at a known step, where a test watching for the marker from
#: outside would race the steps that follow it.
KILL_AFTER_CHECKPOINT_VARIABLE = "KPHI_TEST_KILL_AFTER_CHECKPOINT"


def is_complete_checkpoint(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


class CheckpointMarker(TrainerCallback):
    """Marks ``checkpoint-N`` complete after Trainer has written all of it (``on_save`` runs after saving).

    A process killed during a save leaves a directory without the marker; ``--resume`` ignores and
    removes such directories instead of loading a checkpoint that looks complete but is not.
    """

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"step": state.global_step}))
        if os.environ.get(KILL_AFTER_CHECKPOINT_VARIABLE) == str(state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)


class StepsBegun(TrainerCallback):
    """Whether a training step has begun. Resuming, Trainer loads the checkpoint (weights, optimizer, scheduler,
    trainer state) before the first step: an error before it is the checkpoint's, whatever its wording."""

    def __init__(self):
        self.begun = False

    def on_step_begin(self, args, state, control, **kwargs):
        self.begun = True


class CsvLogger(TrainerCallback):
    """Appends one row per log event to ``log.csv``: step, tokens, train loss, val loss, lr, tokens/s.

    ``tokens_per_step`` is the global number of tokens in one optimizer step (batch x context x
    accumulation x processes). tokens/s in a row covers the steps since the previous training log;
    :attr:`tokens_per_second` covers the whole run. Both count training steps only (evaluation, saving and
    start-up excluded), timed from ``on_step_begin`` to ``on_step_end``.

    ``elapsed_s`` is wall time since the run began, summed over its invocations: a run resumed at step ``s``
    starts its clock at :attr:`resumed_seconds`, the ``elapsed_s`` the log last recorded at a step ``<= s``
    (time spent past ``s`` before an interruption trained nothing the run kept, so it is not counted).
    """

    FIELDS = ["step", "tokens", "elapsed_s", "train_loss", "val_loss", "learning_rate", "tokens_per_second"]

    def __init__(self, path: Path, tokens_per_step: int):
        self.path = Path(path)
        self.tokens_per_step = tokens_per_step
        self._start = time.perf_counter()
        self._step_start: float | None = None
        self.resumed_seconds = 0.0  # elapsed_s of earlier invocations up to the step this one resumed from
        self.train_seconds = 0.0  # summed step time of this process's run
        self.steps_timed = 0
        self._window_seconds = 0.0
        self._window_steps = 0

    @property
    def tokens_per_second(self) -> float | None:
        return self.steps_timed * self.tokens_per_step / self.train_seconds if self.train_seconds else None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if not self.path.exists():
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(self.FIELDS)
        elif state.global_step > 0:
            self.resumed_seconds = self._elapsed_at(state.global_step)

    def _elapsed_at(self, step: int) -> float:
        """The last ``elapsed_s`` the log holds for a step ``<= step`` (0.0 if none)."""
        with open(self.path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r.get("elapsed_s") and int(r["step"]) <= step]
        return float(rows[-1]["elapsed_s"]) if rows else 0.0

    @property
    def elapsed_seconds(self) -> float:
        """Wall seconds of the run so far, earlier invocations included (see the class docstring)."""
        return self.resumed_seconds + time.perf_counter() - self._start

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            spent = time.perf_counter() - self._step_start
            self.train_seconds += spent
            self._window_seconds += spent
            self.steps_timed += 1
            self._window_steps += 1
            self._step_start = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "tokens": state.global_step * self.tokens_per_step}
        row["elapsed_s"] = round(self.elapsed_seconds, 3)
        if "loss" in logs:
            row["train_loss"] = logs["loss"]
            row["learning_rate"] = logs.get("learning_rate")
            if self._window_seconds > 0:
                row["tokens_per_second"] = round(self._window_steps * self.tokens_per_step / self._window_seconds, 1)
            self._window_seconds, self._window_steps = 0.0, 0
        elif "eval_loss" in logs:
            row["val_loss"] = logs["eval_loss"]
        else:
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.FIELDS).writerow(row)


class DivergenceGuard(TrainerCallback):
    """Stops training at the first NaN or infinite training loss, without saving the diverged state."""

    def __init__(self):
        self.diverged_at: int | None = None
        self.value: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.diverged_at, self.value = state.global_step, loss
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False


class TimeLimit(TrainerCallback):
    """Stops training (and saves a checkpoint) once ``minutes`` of training time have passed."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60.0
        self._start: float | None = None
        self.reached = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        expired = self._start is not None and time.perf_counter() - self._start >= self.seconds
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # every process must stop at the same step
            # rank 0's clock decides for all; an object broadcast works on every backend (NCCL refuses
            # a CPU tensor, gloo a CUDA one), and it runs once per step on a single boolean
            decision = [expired]
            dist.broadcast_object_list(decision, src=0)
            expired = bool(decision[0])
        if expired:
            self.reached = True
            control.should_training_stop = True
            control.should_save = True


class ProgressLine(TrainerCallback):
    """One progress line per run: step of total, ETA, last train loss, last validation loss, tokens/s.

    It replaces Trainer's own console output (a bar per evaluation and the raw log dict every
    ``logging_steps``), which for a comparison of many runs is hundreds of lines; every logged value is
    still in ``log.csv`` and TensorBoard.
    """

    def __init__(self, label: str, tokens_per_step: int):
        self.label, self.tokens_per_step = label, tokens_per_step
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step",
                            dynamic_ncols=True, leave=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            rate = self.bar.format_dict.get("rate")
            if rate:
                self.postfix["tok/s"] = f"{rate * self.tokens_per_step:,.0f}"
                self.bar.set_postfix(self.postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.3f}"
        if "eval_loss" in logs:
            self.postfix["val"] = f"{logs['eval_loss']:.3f}"
        self.bar.set_postfix(self.postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
