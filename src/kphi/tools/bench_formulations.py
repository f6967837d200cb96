"""``kphi bench --formulations``: which way of computing the grouped block is fastest on this device?

The block ``y = GL_first(x) + GL_second(interleave(x))`` can be computed several ways
(:data:`kphi.modeling.block.FORMULATIONS`): a loop of ``4 G`` GEMMs written into place (the CPU default), two
``bmm``, one ``bmm`` over the concatenation ``[x_g || interleave(x)_g] @ [W_first[g]; W_second[g]]`` (the
default under ``torch.compile`` and off the CPU) and torch's grouped ``conv1d``. Each is timed forward +
backward at ``tokens`` rows of every phi-3 projection shape, eagerly and under
``torch.compile(fullgraph=True)``, in float32 and under bfloat16 autocast, beside a dense ``nn.Linear``
timed in the same rounds (alternating; medians). A formulation that does not compile to one graph is
reported as such (with the first line of the error), not timed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import first_line
from ..modeling.block import FORMULATIONS
from .bench import PHI3_SHAPES, alternating_medians, bench_device

__all__ = ["FormulationResult", "bench_formulations", "run_formulations", "format_formulations"]


@dataclass
class FormulationResult:
    """One formulation at one shape and precision: median milliseconds of forward + backward (``None``: it
    did not compile; ``error`` says why) and its time over the dense layer's in the same rounds."""

    shape: str
    groups: int
    precision: str
    formulation: str
    compiled: bool
    ms: float | None
    dense_ms: float
    ratio_to_dense: float | None
    error: str | None = None


def _step(fn: Callable, x: torch.Tensor, weights: list[torch.Tensor], grad: torch.Tensor, autocast: bool):
    device_type = x.device.type

    def run():
        for w in weights:
            w.grad = None
        x.grad = None
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, *weights)
        y.backward(grad.to(y.dtype))

    return run


def bench_formulations(in_features: int, out_features: int, groups: int, *, tokens: int = 2048, repeats: int = 5,
                       precision: str = "float32", compile: bool = True, device: str | torch.device = "cpu",
                       formulations: dict[str, Callable] | None = None, backend: str = "inductor") -> list[FormulationResult]:
    """Every formulation (eager, and compiled by ``backend`` when ``compile``) against a dense layer at one shape."""
    if precision not in ("float32", "bf16-autocast"):
        raise ValueError(f"precision is float32 or bf16-autocast, not {precision!r}")
    device = torch.device(device)
    formulations = formulations or FORMULATIONS
    autocast = precision == "bf16-autocast"
    step, out_per_group = in_features // groups, out_features // groups
    weights = [nn.Parameter(torch.randn(groups, step, out_per_group, device=device) * 0.02) for _ in range(2)]
    dense = nn.Parameter(torch.randn(out_features, in_features, device=device) * 0.02)
    x = torch.randn(tokens, in_features, device=device, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device)
    candidates: list[tuple[str, bool, Callable]] = []
    errors: dict[tuple[str, bool], str] = {}
    for name, fn in formulations.items():
        candidates.append((name, False, _step(fn, x, weights, grad, autocast)))
        if compile:
            compiled = _step(torch.compile(fn, fullgraph=True, dynamic=False, backend=backend), x, weights, grad, autocast)
            try:
                compiled()  # compile now, so a failure is reported rather than timed
            except Exception as err:  # noqa: BLE001 - any compiler failure is a result to report
                errors[(name, True)] = first_line(err)[:200]
                torch._dynamo.reset()
            else:
                candidates.append((name, True, compiled))
    dense_step = _step(nn.functional.linear, x, [dense], grad, autocast)
    times = alternating_medians([dense_step] + [c[2] for c in candidates], repeats, device)
    dense_s, timed = times[0], dict(zip([(c[0], c[1]) for c in candidates], times[1:]))
    results = []
    for name in formulations:
        for compiled in ((False, True) if compile else (False,)):
            seconds = timed.get((name, compiled))
            results.append(FormulationResult(
                shape=f"{in_features}->{out_features}", groups=groups, precision=precision, formulation=name,
                compiled=compiled, ms=None if seconds is None else round(seconds * 1e3, 3), dense_ms=round(dense_s * 1e3, 3),
                ratio_to_dense=None if seconds is None else round(seconds / dense_s, 4), error=errors.get((name, compiled))))
    return results


def run_formulations(quick: bool = False, device: str | None = None, compile: bool = True, progress=print) -> dict:
    """Every phi-3 shape in float32 and bf16 autocast (``quick``: 512 rows, 3 repeats, float32 only)."""
    device = bench_device(device)
    tokens, repeats = (512, 3) if quick else (2048, 5)
    rows = []
    for precision in ("float32",) if quick else ("float32", "bf16-autocast"):
        for in_f, out_f, groups in PHI3_SHAPES:
            progress(f"timing formulations of {in_f}->{out_f} (G={groups}), {precision} ...")
            rows += bench_formulations(in_f, out_f, groups, tokens=tokens, repeats=repeats, precision=precision,
                                       compile=compile, device=device)
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "tokens": tokens,
        "repeats": repeats,
        "results": [asdict(r) for r in rows],
        "fastest": _fastest(rows),
    }


def _fastest(rows: list[FormulationResult]) -> dict[str, dict[str, str]]:
    """precision -> shape -> the fastest formulation's name (``compiled`` marked)."""
    best: dict[str, dict[str, FormulationResult]] = {}
    for r in rows:
        if r.ms is None:
            continue
        current = best.setdefault(r.precision, {}).get(r.shape)
        if current is None or r.ms < current.ms:
            best[r.precision][r.shape] = r
    return {p: {s: r.formulation + (" (compiled)" if r.compiled else "") for s, r in shapes.items()}
            for p, shapes in best.items()}


def format_formulations(report: dict) -> str:
    lines = [f"device {report['device']}, torch {report['torch']}, forward + backward at {report['tokens']} rows, "
             f"medians of {report['repeats']}; time over a dense layer's (same rounds)", ""]
    rows = report["results"]
    names = list(dict.fromkeys((r["formulation"], r["compiled"]) for r in rows))
    header = [f"{n}{' (compiled)' if c else ''}" for n, c in names]
    lines += ["| precision | shape | G | dense ms | " + " | ".join(header) + " |", "|--|--|--:|--:|" + "--:|" * len(header)]
    for key in dict.fromkeys((r["precision"], r["shape"]) for r in rows):
        cells = {(r["formulation"], r["compiled"]): r for r in rows if (r["precision"], r["shape"]) == key}
        first = next(iter(cells.values()))
        shown = [("no graph" if cells[n]["ms"] is None else f"{cells[n]['ratio_to_dense']:.3f}") if n in cells else ""
                 for n in names]
        lines.append(f"| {key[0]} | {key[1]} | {first['groups']} | {first['dense_ms']:.1f} | " + " | ".join(shown) + " |")
    lines += ["", "fastest:"] + [f"  {p} {s}: {name}" for p, shapes in report["fastest"].items() for s, name in shapes.items()]
    failed = {(r["formulation"], r["compiled"]): r["error"] for r in rows if r["error"]}
    lines += [f"  {n} does not compile to one graph: {e}" for (n, _), e in failed.items()]
    return "\n".join(lines)
