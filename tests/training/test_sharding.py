"""FSDP2 on two CPU processes (gloo) through kphi's own save and resume code.

accelerate shards only on accelerators, so here the model is sharded as accelerate's FSDP2 would shard it
(``tests/training/fsdp_worker.py``) and kphi's end-of-run writer and resume check are run on it: the training losses
equal one process's on the whole batches, the written model directory loads with the same logits as the
one-process model, and FSDP's sharded checkpoint layout is a resumable checkpoint.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from processes import kphi_env, run_torchrun
from sharding_setup import batches, build_model

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    # the worker imports the tests' shared helpers (tiny.py) from the folder above its own
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    result = run_torchrun(2, [str(HERE / "fsdp_worker.py"), str(out)], cwd=HERE, env=kphi_env({"PYTHONPATH": path}))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _one_process():
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids in batches():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses


def test_fsdp2_losses_and_the_saved_model_equal_one_process(sharded_run):
    from transformers import AutoModelForCausalLM

    model, losses = _one_process()
    torch.testing.assert_close(json.loads((sharded_run / "losses.json").read_text()), losses, rtol=1e-5, atol=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(sharded_run / "model", attn_implementation="eager")
    assert (sharded_run / "model" / "model.safetensors").is_file() and (sharded_run / "model" / "tokenizer.json").is_file()
    ids = batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_an_fsdp_sharded_checkpoint_is_resumable_and_a_half_written_one_is_not(sharded_run, tmp_path):
    import shutil

    from kphi.training.callbacks import COMPLETE_MARKER
    from kphi.training.sharding import SHARDED_MODEL_DIR
    from kphi.train import TrainError, _newest_complete_checkpoint, _validate_checkpoint

    run = tmp_path / "run"
    shutil.copytree(sharded_run / "checkpoint-3", run / "checkpoint-3")
    (run / "checkpoint-3" / COMPLETE_MARKER).write_text("{}")
    found = _newest_complete_checkpoint(run)
    assert found == run / "checkpoint-3"
    _validate_checkpoint(found, build_model())  # no model.safetensors, no config.json: still a checkpoint
    (found / SHARDED_MODEL_DIR / ".metadata").unlink()
    with pytest.raises(TrainError, match="corrupt or incomplete"):
        _validate_checkpoint(found, build_model())
