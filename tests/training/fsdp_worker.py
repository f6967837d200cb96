"""One process of an FSDP2 run on CPU (gloo), started twice by ``torchrun`` from ``test_sharding.py``.

Each process builds the same tiny kphi-3, shards it the way accelerate's FSDP2 does on GPUs (``fully_shard``
on every ``_no_split_modules`` layer, then on the root), trains three AdamW steps on its half of each batch,
then hands the model to kphi's own end-of-run code: every process gathers the full state dict
(:func:`kphi.training.sharding.full_state_dict`), the main one writes the model directory
(:func:`kphi.train.write_model_dir`). It also writes a sharded checkpoint as accelerate's FSDP does
(``checkpoint-3/pytorch_model_fsdp_0``, torch.distributed.checkpoint) for the resume check.

    torchrun --nproc_per_node 2 tests/training/fsdp_worker.py OUT
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from sharding_setup import batches, build_model, tokenizer  # noqa: E402

from kphi.training.sharding import SHARDED_MODEL_DIR, full_state_dict, is_sharded  # noqa: E402
from kphi.train import write_model_dir  # noqa: E402

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = build_model()
for module in model.modules():
    if type(module).__name__ in model._no_split_modules:
        fully_shard(module)
fully_shard(model)
assert is_sharded(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
losses = []
for ids in batches():
    part = ids.chunk(world)[rank]
    loss = model(input_ids=part, labels=part).loss
    loss.backward()  # FSDP2 averages the gradients over the processes: the whole batch's gradient
    optimizer.step()
    optimizer.zero_grad()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / world)

state_dict = full_state_dict(model)  # every process
if rank == 0:
    write_model_dir(model, tokenizer(), out / "model", state_dict)
    (out / "losses.json").write_text(json.dumps(losses))
dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out / "checkpoint-3" / SHARDED_MODEL_DIR))
if rank == 0:
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
dist.barrier()
dist.destroy_process_group()
