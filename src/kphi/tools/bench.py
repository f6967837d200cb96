"""``kphi bench``: is the grouped block as fast as its FLOP count promises?

A kphi-3 projection with ``G`` groups does ``2/G`` of a dense layer's multiply-adds, so its ideal time is
``dense time x 2/G``. For each projection shape the dense ``nn.Linear`` and the block are timed side by
side in the same process, alternating, and medians are reported (machines are noisy; ratios of
neighbouring measurements are what can be trusted):

* forward + backward at 2048 tokens (training and prefill),
* forward at 1 token (decoding; memory-bound: the block reads ``2/G`` of the weight bytes).

Then end to end, on the ``bench-phi3`` / ``bench-kphi3`` presets (equal width): training tokens/s
(forward, backward, AdamW step), greedy generation tokens/s with the KV cache, and peak memory of a
training process (measured in a child process: its peak resident set on CPU, ``max_memory_allocated``
on GPU).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import KphiError, first_line
from ..modeling.block import GroupedPointwiseBlock, group_count
from ..presets import load_preset
from ..sources.auto import KPhi3ForCausalLM

__all__ = ["PHI3_SHAPES", "ShapeResult", "bench_shape", "bench_end_to_end", "run_bench", "format_report"]

#: (in, out, m): phi-3's qkv, o, gate_up and down projections at m = 256, and a small CPU shape at m = 64.
PHI3_PROJECTIONS = [(3072, 9216, 256), (3072, 3072, 256), (3072, 18432, 256), (9216, 3072, 256), (512, 1536, 64)]
#: (in, out, groups) of each, G by the group rule (12, 12, 12, 32 and 8).
PHI3_SHAPES = [(i, o, group_count(i, o, m)) for i, o, m in PHI3_PROJECTIONS]


@dataclass
class ShapeResult:
    """Timings of one projection shape (milliseconds, medians)."""

    name: str
    tokens: int
    groups: int
    dense_ms: float
    kphi_ms: float
    ideal_ratio: float
    ratio: float
    decode_dense_ms: float
    decode_kphi_ms: float
    decode_ratio: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["in"], d["out"] = (int(v) for v in self.name.split("->"))
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternating_medians(fns: list[Callable[[], None]], repeats: int, device: torch.device) -> list[float]:
    """Run each function once to warm up, then ``repeats`` rounds in turn; median seconds of each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench_shape(in_features: int, out_features: int, groups: int, tokens: int = 2048, repeats: int = 5,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ShapeResult:
    """Dense vs block, forward+backward at ``tokens`` tokens and forward at 1 token."""
    device = torch.device(device)
    dense = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    block = GroupedPointwiseBlock(in_features, out_features, groups, device=device, dtype=dtype)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device, dtype=dtype)

    def train_step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(grad)
        return run

    dense_s, kphi_s = alternating_medians([train_step(dense), train_step(block)], repeats, device)
    one = torch.randn(1, in_features, device=device, dtype=dtype)

    def decode(layer):
        def run():
            with torch.no_grad():
                for _ in range(10):
                    layer(one)
        return run

    dec_dense, dec_kphi = alternating_medians([decode(dense), decode(block)], max(repeats, 5), device)
    return ShapeResult(
        name=f"{in_features}->{out_features}",
        tokens=tokens,
        groups=groups,
        dense_ms=round(dense_s * 1e3, 3),
        kphi_ms=round(kphi_s * 1e3, 3),
        ideal_ratio=round(2 / groups, 4),
        ratio=round(kphi_s / dense_s, 4),
        decode_dense_ms=round(dec_dense * 1e3 / 10, 4),
        decode_kphi_ms=round(dec_kphi * 1e3 / 10, 4),
        decode_ratio=round(dec_kphi / dec_dense, 4),
    )


def _model(preset: str, device, dtype):
    torch.manual_seed(0)
    return KPhi3ForCausalLM(load_preset(preset).config).to(device=device, dtype=dtype)


def _train_step_fn(model, batch: int, context: int, device):
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return step


def _generate_fn(model, new_tokens: int, device):
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), device=device)

    def run():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return run


def _peak_rss_mb() -> float:
    """This process's peak resident set in MiB.

    ``VmHWM`` from ``/proc/self/status`` where it exists: ``getrusage``'s ``ru_maxrss`` survives ``fork`` and
    ``exec`` on Linux, so a child would report its parent's peak.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory_mb(preset: str, batch: int, context: int, dtype: str, device: str) -> float | None:
    """Peak memory of a child process doing 2 training steps (RSS on CPU, allocator peak on GPU)."""
    code = (
        "import json, torch; from kphi.tools.bench import _model, _train_step_fn;"
        f"d=torch.device({device!r}); m=_model({preset!r}, d, getattr(torch, {dtype!r})); s=_train_step_fn(m, {batch}, {context}, d);"
        "s(); s();"
        "from kphi.tools.bench import _peak_rss_mb;"
        "peak = torch.cuda.max_memory_allocated()/2**20 if d.type=='cuda' else _peak_rss_mb();"
        "print(json.dumps(peak))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        return None
    return round(float(result.stdout.strip().splitlines()[-1]), 1)


def bench_end_to_end(repeats: int = 5, batch: int = 4, context: int = 256, new_tokens: int = 32,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict:
    """Training and generation tokens/s of ``bench-kphi3`` against ``bench-phi3`` (same width)."""
    device = torch.device(device)
    dense, kphi = _model("bench-phi3", device, dtype), _model("bench-kphi3", device, dtype)
    train_dense, train_kphi = alternating_medians(
        [_train_step_fn(dense, batch, context, device), _train_step_fn(kphi, batch, context, device)], repeats, device
    )
    dense.eval(), kphi.eval()
    gen_dense, gen_kphi = alternating_medians(
        [_generate_fn(dense, new_tokens, device), _generate_fn(kphi, new_tokens, device)], max(2, repeats // 2), device
    )
    dtype_name = str(dtype).removeprefix("torch.")
    mem_dense = _peak_memory_mb("bench-phi3", batch, context, dtype_name, device.type)
    mem_kphi = _peak_memory_mb("bench-kphi3", batch, context, dtype_name, device.type)
    tokens = batch * context
    return {
        "presets": ["bench-phi3", "bench-kphi3"],
        "batch": batch,
        "context": context,
        "train_tokens_per_second": {"dense": round(tokens / train_dense, 1), "kphi": round(tokens / train_kphi, 1)},
        "train_speedup": round(train_dense / train_kphi, 3),
        "generate_tokens_per_second": {"dense": round(new_tokens / gen_dense, 1), "kphi": round(new_tokens / gen_kphi, 1)},
        "generate_speedup": round(gen_dense / gen_kphi, 3),
        "peak_memory_mb": {"dense": mem_dense, "kphi": mem_kphi},
    }


class BenchError(KphiError, ValueError):
    """A benchmark cannot run as asked (a device this machine does not have)."""


def bench_device(device: str | None) -> str:
    """``device`` (``cpu``, ``cuda``, ``cuda:1``, ...) checked against what torch reads and this machine has;
    ``None`` is cuda when available, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise BenchError(f"--device {device!r} is not a device torch knows ({first_line(err)})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: this machine has no CUDA device")
    if kind not in ("cpu", "cuda"):
        raise BenchError(f"--device {device}: kphi bench times cpu or cuda")
    return device


def run_bench(quick: bool = False, dtype: str = "float32", device: str | None = None, progress=print) -> dict:
    """All shapes plus the end-to-end comparison; ``quick`` uses fewer repeats and 512 tokens."""
    device = bench_device(device)
    torch_dtype = getattr(torch, dtype)
    tokens, repeats = (512, 3) if quick else (2048, 5)
    shapes = []
    for in_f, out_f, groups in PHI3_SHAPES:
        progress(f"timing {in_f}->{out_f} (G={groups}) ...")
        shapes.append(bench_shape(in_f, out_f, groups, tokens=tokens, repeats=repeats, dtype=torch_dtype, device=device))
    progress("timing end to end (bench-phi3 vs bench-kphi3) ...")
    e2e = bench_end_to_end(repeats=3 if quick else 5, dtype=torch_dtype, device=device)
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": dtype,
        "torch": torch.__version__,
        "tokens": tokens,
        "repeats": repeats,
        "shapes": [s.to_dict() for s in shapes],
        "end_to_end": e2e,
    }


def format_report(report: dict) -> str:
    lines = [
        f"device {report['device']}, {report['dtype']}, torch {report['torch']}, medians of {report['repeats']}",
        "",
        "| shape | G | dense ms | kphi ms | ideal | ratio | ratio / ideal | decode dense ms | decode kphi ms | decode ratio |",
        "|--|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in report["shapes"]:
        lines.append(
            f"| {s['name']} | {s['groups']} | {s['dense_ms']:.1f} | {s['kphi_ms']:.1f} | {s['ideal_ratio']:.3f} | "
            f"{s['ratio']:.3f} | {s['ratio'] / s['ideal_ratio']:.2f}x | {s['decode_dense_ms']:.3f} | "
            f"{s['decode_kphi_ms']:.3f} | {s['decode_ratio']:.3f} |"
        )
    e = report["end_to_end"]
    lines += [
        "",
        f"end to end ({e['presets'][0]} vs {e['presets'][1]}, batch {e['batch']} x {e['context']} tokens):",
        f"  training   {e['train_tokens_per_second']['dense']:,.0f} vs {e['train_tokens_per_second']['kphi']:,.0f} tokens/s "
        f"({e['train_speedup']:.2f}x)",
        f"  generation {e['generate_tokens_per_second']['dense']:,.1f} vs {e['generate_tokens_per_second']['kphi']:,.1f} tokens/s "
        f"({e['generate_speedup']:.2f}x)",
        f"  peak memory {e['peak_memory_mb']['dense']} MB vs {e['peak_memory_mb']['kphi']} MB",
    ]
    return "\n".join(lines)
