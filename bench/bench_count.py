"""Counting speed and memory against PEFT's own route, in one process, printing the ratios.

Reference: `get_peft_model(meta model, LoraConfig(...), low_cpu_mem_usage=True)` +
`get_nb_trainable_parameters()` for each of the seed article's 36 "balanced" configurations on
Llama-3.1-70B (a fresh meta model each time: PEFT mutates the model it wraps).
Goals (issue 2): identical counts, >= 100x faster; a repeated count after changing only r or alpha
< 5 ms; a cold first count of a new 70B config < 2 s; peak RSS of a counting process < 600 MB.

Run: `.venv/bin/python bench/bench_count.py` (add `--quick` to time 6 reference configs, not 36).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "meta-llama/Llama-3.1-70B-Instruct"


def peft_route(settings_list) -> tuple[list[int], float]:
    from peft import get_peft_model

    from lora_core.models import build_meta_model, resolve_model

    spec = resolve_model(MODEL)
    counts = []
    start = time.perf_counter()
    for settings in settings_list:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_meta_model(spec)
            peft_model = get_peft_model(model, copy.deepcopy(settings.to_peft_config()), low_cpu_mem_usage=True)
        counts.append(peft_model.get_nb_trainable_parameters()[0])
    return counts, time.perf_counter() - start


def engine_route(settings_list) -> tuple[list[int], float]:
    from lora_core import count_lora_params

    start = time.perf_counter()
    counts = [count_lora_params(MODEL, s).trainable_params for s in settings_list]
    return counts, time.perf_counter() - start


def cold_count() -> float:
    """A first count of a 70B config this process has never seen (imports already done)."""
    from lora_core import LoraSettings, count_lora_params, spec_from_text
    from lora_core.models import catalogue_path

    data = json.loads(catalogue_path("meta-llama/Llama-2-70b-hf").read_text())
    data["_bench_nonce"] = time.time_ns()  # a config no cache has seen
    spec = spec_from_text(json.dumps(data), "llama-2-70b-cold")
    start = time.perf_counter()
    count_lora_params(spec, LoraSettings(r=16, target_modules="all-linear"))
    return time.perf_counter() - start


def repeated_counts() -> list[float]:
    """Timings of counts that change only r or alpha after a first count (the slider case)."""
    from lora_core import LoraSettings, count_lora_params

    base = LoraSettings(r=16, lora_alpha=32, target_modules="all-linear")
    count_lora_params(MODEL, base)
    times = []
    for r in (4, 8, 24, 32, 48, 64, 96, 128):
        for alpha in (8, 64):
            start = time.perf_counter()
            count_lora_params(MODEL, base.replace(r=r, lora_alpha=alpha))
            times.append(time.perf_counter() - start)
    return times


def peak_rss_subprocess() -> float:
    """Peak RSS (MB) of a fresh process that imports the engine and counts Llama-3.1-70B."""
    code = (
        "import resource\n"
        "from lora_core import LoraSettings, count_lora_params\n"
        "from lora_core.strategies import count_search_space\n"
        f"count_lora_params({MODEL!r}, LoraSettings(r=16, target_modules='all-linear'))\n"
        f"count_search_space({MODEL!r}, 'balanced')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="time 6 reference configs instead of 36")
    args = parser.parse_args()

    start = time.perf_counter()
    import peft  # noqa: F401 - both routes need torch, transformers and peft imported
    import transformers  # noqa: F401

    from lora_core import inventory, resolve_model
    from lora_core.strategies import search_space

    print(f"imports (torch, transformers, peft, lora_core), not timed below: {time.perf_counter() - start:.1f} s")

    configs = search_space("balanced")
    reference_configs = configs[:: len(configs) // 6][:6] if args.quick else configs
    print(f"model: {MODEL}; configurations: {len(configs)} (seed In[26] 'balanced')")

    start = time.perf_counter()
    inventory(resolve_model(MODEL))
    inventory_s = time.perf_counter() - start

    engine_counts, engine_s = engine_route(configs)
    peft_counts, peft_s = peft_route(reference_configs)
    expected = [engine_counts[configs.index(s)] for s in reference_configs]
    identical = peft_counts == expected
    peft_36 = peft_s * len(configs) / len(reference_configs)
    print(
        f"PEFT route ({len(reference_configs)} configs, fresh meta model each): {peft_s:.2f} s -> {peft_36:.2f} s for 36"
    )
    print(f"engine, model inventory warm: {engine_s * 1000:.1f} ms for 36  -> {peft_36 / engine_s:.0f}x faster")
    print(
        f"engine incl. building the inventory ({inventory_s * 1000:.0f} ms): {(engine_s + inventory_s) * 1000:.0f} ms"
        f" -> {peft_36 / (engine_s + inventory_s):.0f}x faster"
    )
    print(f"counts identical to PEFT: {identical}")

    times = repeated_counts()
    print(
        f"repeated count after changing only r or alpha: median {statistics.median(times) * 1000:.2f} ms,"
        f" max {max(times) * 1000:.2f} ms (goal < 5 ms)"
    )
    print(f"cold first count of a new 70B config: {cold_count():.2f} s (goal < 2 s)")
    print(f"peak RSS of a process counting Llama-3.1-70B: {peak_rss_subprocess():.0f} MB (goal < 600 MB)")
    print(f"(this process, which also ran PEFT: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
