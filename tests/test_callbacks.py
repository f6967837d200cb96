"""Several processes and launchers: rank 0's clock stops every rank at the same step; experiments refuse torchrun;
the launcher's precision and sharding requests are followed or refused, never silently changed."""

import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import TrainerControl

from kphi.callbacks import TimeLimit
from processes import free_port


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank 0's limit has passed, rank 1's is an hour away: both must stop, as rank 0 decides
        limit = TimeLimit(minutes=0.0 if rank == 0 else 60.0)
        limit.on_train_begin(None, None, None)
        control = TrainerControl()
        limit.on_step_end(None, None, control)
        results[rank] = (control.should_training_stop, control.should_save, limit.reached)
    finally:
        dist.destroy_process_group()


def test_time_limit_stops_every_rank_when_rank_0_runs_out():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: (True, True, True), 1: (True, True, True)}


def test_experiments_refuse_to_run_under_several_processes(tmp_path):
    from processes import run_kphi

    # compare, scale and compress share the check (cli._single_process); one real process shows it
    run = run_kphi("compare", "--suite", "smoke", "--out", tmp_path / "out", cache=tmp_path / "cache",
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
