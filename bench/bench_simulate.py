"""The rank simulation: the article's loop against the batched engine, same process, same losses.

Reference: the seed article's In[4] loop (nn.Parameter + torch.optim.Adam, one rank after another),
corrected to share the target, data and initialisation so both compute the same thing.
Goal (issue 3): >= 10x faster on this CPU on the article's experiment (d=256, 500 samples,
100 epochs, ranks 2,4,8,16,32), with the same losses.

Run: `.venv/bin/python bench/bench_simulate.py [--device cuda]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_core.simulate import article_rank_loop, device_description, simulate_dropout, simulate_rank_sweep


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"device for the engine: {device_description(args.device)}")
    # warm-up of both sides: first-call costs (imports, Adam's first step, thread pools) are neither loop's
    simulate_rank_sweep(epochs=3, device=args.device)
    article_rank_loop(epochs=3)

    # alternating rounds, so the VM's speed drift hits both sides alike
    article_times, engine_times = [], []
    for _ in range(args.repeats):
        seconds, article = best_of(article_rank_loop, 1)
        article_times.append(seconds)
        seconds, engine = best_of(lambda: simulate_rank_sweep(device=args.device), 1)
        engine_times.append(seconds)
    article_s, engine_s = min(article_times), min(engine_times)
    round_ratios = [a / e for a, e in zip(article_times, engine_times)]
    merged = article.merge(engine, on=["rank", "epoch"], suffixes=("_article", "_engine"))
    relative = ((merged["loss_article"] - merged["loss_engine"]).abs() / merged["loss_article"].abs()).max()
    print(
        f"experiment: d_in=d_out=256, 500 samples, 100 epochs, ranks 2,4,8,16,32 "
        f"(best of {args.repeats} alternating rounds)"
    )
    print(f"article loop (sequential, shared target): {article_s:.3f} s")
    print(f"batched engine (+ closed-form floors):     {engine_s:.3f} s")
    print(f"speed-up: {article_s / engine_s:.1f}x best-of (goal >= 10x)")
    print(
        f"per-round speed-ups: {', '.join(f'{r:.1f}x' for r in round_ratios)}; median {statistics.median(round_ratios):.1f}x"
    )
    print(f"largest relative loss difference over all {len(merged)} (rank, epoch) points: {relative:.2e}")
    final = engine.groupby("rank").agg(loss=("loss", "last"), floor=("floor", "first"))
    print(final.to_string())

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        simulate_dropout(num_forward=1000, device=args.device)
        times.append(time.perf_counter() - start)
    print(f"dropout simulation, 4 rates x 1,000 passes (vectorised): {statistics.median(times) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
