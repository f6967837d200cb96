"""The compute plan of budget series: measured training speed of every arm, times the tokens each series has left.

    OMP_NUM_THREADS=1 python scripts/plan-series.py cpu-text-w64 cpu-text-w96 cpu-text-w128 [--done RESULTS_DIR ...]

Each arm's model (as its suite builds it) takes AdamW training steps of the suite's batch on random tokens, the
arms in turns, one thread; the median step time of each gives its tokens per second. The hours a series has left
are the sum over its planned runs not yet finished (a run counts as finished when RESULTS_DIR/tokens-N/NAME.json
or NAME.diverged.json is committed) of tokens / speed. One process times all arms side by side, so the ratios
between widths hold on a busy machine even where the absolute speeds do not.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from kphi.experiments.arms import resolve_arms
from kphi.experiments.budgets import plan_budget_series
from kphi.experiments.compare import planned_runs
from kphi.experiments.suites import load_suite
from kphi.modeling.modeling_kphi3 import KPhi3ForCausalLM


def step_seconds(models: dict, batch: int, context: int, vocab: int, repeats: int) -> dict[str, float]:
    """Median seconds of one forward + backward + AdamW step of each model, taken in turns."""
    optimizers = {key: torch.optim.AdamW(model.parameters(), lr=1e-3) for key, model in models.items()}
    tokens = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0))
    times = {key: [] for key in models}
    for repeat in range(repeats + 1):
        for key, model in models.items():
            start = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
            if repeat:  # the first round warms up
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="+")
    parser.add_argument("--done", nargs="*", default=[], help="committed results directories, one per suite, in order")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    suites = [load_suite(name) for name in args.suites]
    arms = {(suite.name, arm.label): arm for suite in suites for arm in resolve_arms(suite)}
    models = {key: KPhi3ForCausalLM(arm.config).train() for key, arm in arms.items()}
    training = suites[0].training
    seconds = step_seconds(models, training["batch_size"], training["context_length"], suites[0].data["vocab_size"], args.repeats)
    per_step = training["batch_size"] * training["context_length"]
    print("| suite | arm | tokens/s (1 thread) | runs left | tokens left | hours left |")
    print("|:--|:--|--:|--:|--:|--:|")
    total = 0.0
    for index, suite in enumerate(suites):
        done = Path(args.done[index]) if index < len(args.done) else None
        for arm in resolve_arms(suite):
            speed = per_step / seconds[(suite.name, arm.label)]
            left = [tokens for c in plan_budget_series(suite, Path("plan")) for tokens, done_already in
                    _runs(arm, c, done / c.out.name if done else None) if not done_already]
            hours = sum(left) / speed / 3600
            total += hours
            print(f"| {suite.name} | {arm.label} | {speed:,.0f} | {len(left)} | {sum(left):,} | {hours:.1f} |")
    print(f"\n{total:.1f} hours of one thread left in all")


def _runs(arm, comparison, committed: Path | None) -> list[tuple[int, bool]]:
    """``(tokens, finished)`` of each run an arm has in one comparison (compare's own plan); a run is finished
    when its NAME.json or NAME.diverged.json is committed."""
    tokens = comparison.suite.training["max_tokens"]

    def finished(pattern: str) -> bool:
        return committed is not None and any(any(committed.glob(pattern + suffix)) for suffix in (".json", ".diverged.json"))

    return [(tokens, finished(pattern)) for pattern in planned_runs(comparison, arm)]


if __name__ == "__main__":
    main()
