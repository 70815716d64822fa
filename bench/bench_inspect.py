"""Inspection speed on a Llama-2-7B-sized adapter, against the naive spectrum, in one run.

Adapter: r=64 on all seven linear types of Llama-2-7B's 32 layers (q/k/v/o 4096x4096, gate/up
11008x4096, down 4096x11008: 224 modules), float32, random factors, written once to
artifacts/bench-inspect/ (about 640 MB) and reused.
Reference: `torch.linalg.svdvals(scale * B @ A)` per module, the d_out x d_in product formed. It
takes seconds per module, so one module of each of the three shapes is timed and the total scaled
by how many modules have that shape; the sampled modules' spectra are also checked against the
engine's. Rounds alternate one whole inspection and one naive sample, as the machine's cores are
shared and its speed drifts; the verdicts are the medians over rounds.
Goals (issue 15): the whole inspection (reading the file included) under 5 s on this CPU, and at
least 50x faster than the naive route.

Run: `.venv/bin/python bench/bench_inspect.py [--rounds 3]` (about 2 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lora_core.inspect import inspect_adapter, open_adapter

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "artifacts" / "bench-inspect"
LAYERS, R, ALPHA = 32, 64, 16
SHAPES = {  # module -> (d_out, d_in) in Llama-2-7B
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def write_adapter(folder: Path) -> None:
    """The synthetic adapter, as PEFT's save_pretrained lays it out."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        for name, (d_out, d_in) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(R, d_in, generator=generator) / d_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, R, generator=generator) / R
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": ALPHA,
        "target_modules": sorted({name.split(".")[-1] for name in SHAPES}),
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def naive(folder: Path) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds the naive route would take for all 224 modules (one module timed per shape, scaled
    by how many have that shape), and the sampled modules' spectra."""
    from safetensors import safe_open

    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in SHAPES.items():
        by_shape.setdefault(shape, []).append(name)
    total, spectra = 0.0, {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as reader:
        for names in by_shape.values():
            prefix = f"base_model.model.model.layers.0.{names[0]}"
            start = time.perf_counter()
            a, b = reader.get_tensor(f"{prefix}.lora_A.weight"), reader.get_tensor(f"{prefix}.lora_B.weight")
            spectra[prefix.removeprefix("base_model.model.")] = torch.linalg.svdvals(ALPHA / R * b @ a)[:R].numpy()
            total += (time.perf_counter() - start) * len(names) * LAYERS
    return total, spectra


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds: one inspection, one naive sample")
    args = parser.parse_args()
    if not (FOLDER / "adapter_config.json").is_file():
        start = time.perf_counter()
        write_adapter(FOLDER)
        print(f"wrote the synthetic adapter to {FOLDER} in {time.perf_counter() - start:.1f} s")
    size = (FOLDER / "adapter_model.safetensors").stat().st_size
    print(f"adapter: r={R}, {LAYERS * len(SHAPES)} modules of Llama-2-7B, {size / 1e6:,.0f} MB float32")
    print(f"torch threads {torch.get_num_threads()}; load average before: {os.getloadavg()[0]:.2f} (shared cores)")
    start = time.perf_counter()
    inspect_adapter(open_adapter(FOLDER))
    print(
        f"first inspection in this process (with its imports, PEFT's among them): {time.perf_counter() - start:.2f} s"
    )

    # Alternating rounds, so a slow spell of the shared machine hits both sides alike.
    engine_times, naive_times = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        inspection = inspect_adapter(open_adapter(FOLDER))
        engine_times.append(time.perf_counter() - start)
        seconds, spectra = naive(FOLDER)
        naive_times.append(seconds)
    ratios = [n / e for n, e in zip(naive_times, engine_times)]
    worst = max(float(np.abs(inspection.spectra[name] - values).max() / values[0]) for name, values in spectra.items())
    count = len(inspection.modules)
    print(
        f"engine, open + spectra of all {count} modules from r x r factors: "
        + ", ".join(f"{t:.2f} s" for t in engine_times)
    )
    print(
        f"naive svdvals(B @ A), all {count} modules scaled from one per shape: "
        + ", ".join(f"{t:,.0f} s" for t in naive_times)
    )
    print(f"per round (naive / engine): {', '.join(f'{r:,.0f}x' for r in ratios)}")
    print(f"largest spectrum difference on the sampled modules, relative to the top singular value: {worst:.1e}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    engine, ratio = statistics.median(engine_times), statistics.median(ratios)
    print(
        f"engine median {engine:.2f} s (goal < 5 s: {'met' if engine < 5 else 'NOT met'}); "
        f"speed-up {ratio:,.0f}x, the median of the rounds (goal >= 50x: {'met' if ratio >= 50 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
