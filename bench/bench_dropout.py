"""The dropout study: the batched engine against a per-configuration loop, same process, same losses.

Reference: `dropout_study_loop`, the same math one (rank, rate, n, seed) configuration at a time
with its own small tensors (nn.Parameter, autograd, torch.optim.Adam), the same random numbers and
steps. Goal (issue 14): >= 10x faster on this CPU on the study's default grid.
The loop is slow (the full grid is minutes), so it runs a sample of configurations spread over the
ranks and sizes and its time is scaled to the full grid by its share of the grid's rank-weighted
work (a config's flops grow with its rank; the loop's fixed per-step cost does not, so the scaled
figure is close to a full loop's). The sample's losses are compared with the engine's.

Run: `.venv/bin/python bench/bench_dropout.py [--device cuda] [--sample 24]`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

import pandas as pd

from lora_core.dropout_study import DEFAULT_STUDY, dropout_study_loop, run_dropout_study
from lora_core.simulate import device_description

KEYS = ["rank", "step", "dropout", "samples", "seed"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    parser.add_argument("--sample", type=int, default=24, help="configurations the loop runs")
    args = parser.parse_args()
    study = DEFAULT_STUDY
    grid = [(r, p, n, s) for r in study.ranks for p in study.rates for n in study.samples for s in range(study.seeds)]
    rng = random.Random(0)
    # every rank in the sample, the rest drawn at random
    sample = [rng.choice([c for c in grid if c[0] == r]) for r in study.ranks]
    sample += rng.sample([c for c in grid if c not in sample], max(args.sample - len(sample), 0))
    print(f"device for the engine: {device_description(args.device)}; the loop runs on the CPU")
    run_dropout_study(replace(study, steps=5), device=args.device)  # warm-up: imports, first calls
    dropout_study_loop(replace(study, steps=5), sample[:2])

    # Alternating rounds (one engine run, then a slice of the loop's sample), so the machine's
    # speed drift and other processes' load hit both sides alike; the verdict is the median ratio.
    work = {c: c[0] + 8 for c in grid}  # flops grow with the rank; +8 stands for the per-step cost
    total_work = sum(work.values())
    slices = [sample[i :: args.rounds] for i in range(args.rounds)]
    engine_times, loop_times, ratios, loops = [], [], [], []
    for chunk in slices:
        start = time.perf_counter()
        engine = run_dropout_study(study, device=args.device)
        engine_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        loops.append(dropout_study_loop(study, chunk))
        loop_times.append(time.perf_counter() - start)
        ratios.append(loop_times[-1] / (sum(work[c] for c in chunk) / total_work) / engine_times[-1])
    loop = pd.concat(loops, ignore_index=True)
    share = sum(work[c] for c in sample) / total_work
    full_loop = sum(loop_times) / share
    ratio = statistics.median(ratios)
    print(
        f"grid: ranks {list(study.ranks)} x rates {list(study.rates)} x n {list(study.samples)} x "
        f"{study.seeds} seeds = {len(grid)} configs, {study.steps} steps, batch {study.batch}, d = {study.d}"
    )
    print(
        f"batched engine (all {len(grid)} configs): median {statistics.median(engine_times):.2f} s, "
        f"best {min(engine_times):.2f} s ({args.rounds} runs)"
    )
    print(
        f"per-config loop: {len(sample)} configs in {sum(loop_times):.2f} s "
        f"({sum(loop_times) / len(sample) * 1000:.0f} ms each); scaled to the grid by its share of rank-weighted "
        f"work ({share:.1%}): {full_loop:.1f} s (by count, {len(sample) / len(grid):.1%}: "
        f"{sum(loop_times) * len(grid) / len(sample):.1f} s)"
    )
    print(f"per round (scaled loop slice / engine run): {', '.join(f'{r:.1f}x' for r in ratios)}")
    print(
        f"speed-up: {ratio:.1f}x, the median of the rounds (goal >= 10x: {'met' if ratio >= 10 else 'NOT met'}); "
        f"scaled loop total / best engine run {full_loop / min(engine_times):.1f}x"
    )
    merged = loop.merge(engine, on=KEYS, suffixes=("_loop", "_engine"))
    assert len(merged) == len(loop), "the loop's rows are missing from the engine's"
    for column in ("train_loss", "heldout_loss"):
        difference = (merged[f"{column}_loop"] - merged[f"{column}_engine"]).abs() / merged[f"{column}_loop"].abs()
        print(f"largest relative {column} difference over {len(merged)} (config, step) points: {difference.max():.2e}")


if __name__ == "__main__":
    main()
