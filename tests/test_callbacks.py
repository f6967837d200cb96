"""Trainer callbacks under several processes: rank 0's clock stops every rank at the same step."""

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
    for command in (["compare", "--suite", "smoke"],):
        run = run_kphi(*command, "--out", tmp_path / "out", cache=tmp_path / "cache", env={"WORLD_SIZE": "2", "RANK": "1"})
        assert run.returncode == 2 and run.stderr.startswith(f"kphi: error: kphi {command[0]} runs in one process"), run.stderr
        assert not (tmp_path / "out").exists()
