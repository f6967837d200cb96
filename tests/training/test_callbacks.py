"""Several processes and launchers: rank 0's clock stops every rank at the same step; experiments refuse torchrun;
the launcher's precision and sharding requests are followed or refused, never silently changed; the log's clock runs on across a resume."""

import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import TrainerControl

from kphi.training.callbacks import TimeLimit


def _rank(rank: int, store: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # rank 0's limit has passed, rank 1's is an hour away: both must stop, as rank 0 decides
        limit = TimeLimit(minutes=0.0 if rank == 0 else 60.0)
        limit.on_train_begin(None, None, None)
        control = TrainerControl()
        limit.on_step_end(None, None, control)
        results[rank] = (control.should_training_stop, control.should_save, limit.reached)
    finally:
        dist.destroy_process_group()


def test_time_limit_stops_every_rank_when_rank_0_runs_out(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    assert dict(results) == {0: (True, True, True), 1: (True, True, True)}


def _refusing_rank(rank: int, store: str, results) -> None:
    from kphi.train import TrainError, _main_process_first

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        def refuse():
            raise TrainError("runs/x already holds a finished run")

        try:
            _main_process_first(rank == 0, refuse, on_others=lambda found: results.setdefault(f"others-{rank}", found))
            results[rank] = "went on"
        except TrainError as err:
            results[rank] = str(err)
        # and a verdict that is a value reaches the others through on_others
        results[f"value-{rank}"] = _main_process_first(rank == 0, lambda: "checkpoint-4", on_others=lambda found: found + "!")
    finally:
        dist.destroy_process_group()


def test_a_refusal_on_the_main_process_reaches_every_rank(tmp_path):
    """Checks that touch the run directory run once, on rank 0; when they refuse, the other ranks must raise
    the same error rather than go on (or hang in the next collective)."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_refusing_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    assert results[0] == results[1] == "runs/x already holds a finished run"
    assert results["value-0"] == "checkpoint-4" and results["value-1"] == "checkpoint-4!"
    assert "others-1" not in results  # on_others never ran: the verdict was an error


def test_experiments_refuse_to_run_under_several_processes(tmp_path):
    from processes import run_cli

    # compare, scale and compress share the check (cli._single_process); one real process shows it
    run = run_cli("compare", "--suite", "smoke", "--out", tmp_path / "out", cache=tmp_path / "cache",
                   env={"WORLD_SIZE": "2", "RANK": "1"})
    assert run.returncode == 2 and run.stderr.startswith("kphi: error: kphi compare runs in one process"), run.stderr
    assert not (tmp_path / "out").exists()


def test_the_launchers_precision_is_followed_or_a_conflict_is_one_error():
    import pytest

    from kphi.train import TrainError, effective_precision

    assert effective_precision("auto", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    assert effective_precision("auto", {"ACCELERATE_MIXED_PRECISION": "no"}) == "fp32"
    assert effective_precision("fp32", {"ACCELERATE_MIXED_PRECISION": "no"}) == "fp32"
    assert effective_precision("bf16", {}) == "bf16"
    with pytest.raises(TrainError, match="mixed_precision bf16 and --precision is fp32"):
        effective_precision("fp32", {"ACCELERATE_MIXED_PRECISION": "bf16"})


def test_sharding_asked_for_but_not_enabled_is_an_error():
    import pytest

    from kphi.train import TrainError, check_sharding_enabled

    class PlainTrainer:
        is_fsdp_enabled = False
        is_deepspeed_enabled = False

    check_sharding_enabled(PlainTrainer(), {})  # nothing asked for: fine
    with pytest.raises(TrainError, match="asked for FSDP but Trainer did not enable it"):
        check_sharding_enabled(PlainTrainer(), {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(TrainError, match="asked for DeepSpeed"):
        check_sharding_enabled(PlainTrainer(), {"ACCELERATE_USE_DEEPSPEED": "true"})

    class Sharded(PlainTrainer):
        is_fsdp_enabled = True

    check_sharding_enabled(Sharded(), {"ACCELERATE_USE_FSDP": "true"})


def test_the_log_clock_of_a_resumed_run_continues_from_the_step_it_resumed_at(tmp_path):
    """A run resumed at step 4 starts its clock at the elapsed time the log recorded at step 4; the time an
    earlier invocation spent past step 4 (lost with the interruption) is not counted."""
    import csv
    from types import SimpleNamespace

    from kphi.training.callbacks import CsvLogger

    log = tmp_path / "log.csv"
    with open(log, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CsvLogger.FIELDS)
        writer.writeheader()
        for step, elapsed in ((2, 10.0), (4, 20.0), (6, 35.0)):
            writer.writerow({"step": step, "elapsed_s": elapsed, "train_loss": 1.0})
    logger = CsvLogger(log, tokens_per_step=8)
    state = SimpleNamespace(is_world_process_zero=True, global_step=4)
    logger.on_train_begin(None, state, None)
    assert logger.resumed_seconds == 20.0
    state.global_step = 5
    logger.on_log(None, state, None, logs={"loss": 0.9, "learning_rate": 1e-3})
    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[-1]["step"] == "5" and 20.0 <= float(rows[-1]["elapsed_s"]) < 35.0
    fresh = CsvLogger(tmp_path / "new.csv", tokens_per_step=8)
    fresh.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=0), None)
    assert fresh.resumed_seconds == 0.0 and fresh.elapsed_seconds < 20.0
