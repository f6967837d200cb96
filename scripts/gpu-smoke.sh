#!/usr/bin/env bash
# The GPU smoke run (issue 19): everything a CPU machine cannot check, on one CUDA GPU, in under 10 minutes.
#
#   bash scripts/gpu-smoke.sh [OUT]          (after: pip install torch==<a CUDA build> && pip install -e ".[test]")
#
# NOT RUN YET: no GPU has been lent to this project's machines. Until it has run, every GPU statement in the
# README and BENCHMARKS.md says "unmeasured". What it does, each step failing the script on error:
#   1. the block on CUDA: every formulation against the naive loops (values and gradients), float32 and bf16
#      autocast, and a kphi-3 training step under torch.compile(fullgraph=True) against eager;
#   2. kphi bench on CUDA in bf16 (shapes and end to end) and kphi bench --formulations (eager and compiled);
#   3. 20 steps of JP47D55C with the report's recipe (context 4096, batch 1, bf16, phi-3 tokenizer);
#   4. DDP, FSDP and DeepSpeed (the shipped launch files, one process each): 3 steps with a checkpoint, then
#      --resume to 5 steps, then the written model directory loaded back.
set -euo pipefail
OUT=${1:-runs/gpu-smoke}
mkdir -p "$OUT"
export KPHI_CACHE=${KPHI_CACHE:-$OUT/cache}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')"
start=$(date +%s)

echo "== 1. the block on CUDA"
python - <<'PY'
import torch
from kphi.block import FORMULATIONS, GroupedPointwiseBlock
from transformers import AutoModelForCausalLM
from kphi.presets import load_preset

block = GroupedPointwiseBlock(3072, 9216, 12, device="cuda")  # qkv_proj at the report's G = 12
for p in block.parameters():
    torch.nn.init.normal_(p, std=0.02)
w1, w2 = block.first_pointwise_conv.weight, block.second_pointwise_conv.weight
for name, fn in FORMULATIONS.items():
    for autocast in (False, True):
        x = torch.randn(2048, 3072, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, w1, w2)
        ref = block.naive_forward(x)  # per-group loops and an explicit interleaved copy
        tol = 3e-2 if autocast else 1e-4
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
        grads = torch.autograd.grad(y.float().sum(), [x, w1, w2])
        for a, b in zip(grads, torch.autograd.grad(ref.sum(), [x, w1, w2])):
            torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)
        print(f"  {name}, {'bf16 autocast' if autocast else 'float32'}: equal to the naive loops")
model = AutoModelForCausalLM.from_config(load_preset("tiny-kphi3").config).cuda()
ids = torch.randint(0, model.config.vocab_size, (2, 512), device="cuda")
eager = model(input_ids=ids, labels=ids).loss
compiled = torch.compile(model, fullgraph=True)(input_ids=ids, labels=ids).loss
compiled.backward()
torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
print("  torch.compile(fullgraph=True) training step: equal to eager")
PY

echo "== 2. kphi bench on CUDA"
kphi bench --device cuda --dtype bfloat16 --json > "$OUT/bench-bf16.json"
kphi bench --formulations --device cuda --json > "$OUT/formulations.json"
kphi bench --formulations --device cuda < /dev/null | tail -n 30

echo "== 3. JP47D55C, the report's recipe, 20 steps"
kphi train --preset JP47D55C --data default --max-steps 20 --eval-steps 20 --eval-rows 8 --save-steps 20 \
    --out "$OUT/jp47d55c" --quiet
python -c "import json; m = json.load(open('$OUT/jp47d55c/metrics.json')); print('  val loss', m['val_loss'], 'tokens/s', m['tokens_per_second'], 'precision', m['precision_effective'])"

echo "== 4. DDP, FSDP and DeepSpeed: save, resume, load"
for config in ddp-gpus fsdp deepspeed; do
  run="$OUT/$config"
  common=(--preset tiny-kphi3 --data default --batch-size 4 --eval-steps 3 --eval-rows 8 --save-steps 3 --out "$run" --quiet)
  accelerate launch --config_file "$(kphi configs "$config")" --num_processes 1 -m kphi train "${common[@]}" --max-steps 3
  accelerate launch --config_file "$(kphi configs "$config")" --num_processes 1 -m kphi train "${common[@]}" --max-steps 5 --resume
  python -c "import json, kphi; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('$run'); print('  $config: steps', json.load(open('$run/metrics.json'))['steps'])"
done
echo "gpu smoke: passed in $(( $(date +%s) - start )) s"
