"""The adapter inspector: what a LoRA adapter's updates hold, module by module.

- `loading`: an adapter from a folder, a zip, a run of the store or a Hub id, checked;
- `spectra`: each update's singular values from the QR factors of B and A (never B A itself);
- `summary`: the share of the configured rank used, by module type, by depth, overall;
- `right_size`: smaller ranks for a chosen energy, and the truncated adapter PEFT loads;
- `compare`: the LoRA paper's subspace similarity between two adapters of one base;
- `cli`: `python -m lora_core inspect`.
"""

from __future__ import annotations

from lora_core.inspect.compare import Comparison, compare_adapters, subspace_similarity
from lora_core.inspect.loading import (
    Adapter,
    AdapterError,
    check_adapter,
    open_adapter,
    open_zip,
    prune_unpacked,
    unpack_zip,
)
from lora_core.inspect.right_size import (
    RightSize,
    check_out_dir,
    plan_right_size,
    right_sized_config,
    write_right_sized,
)
from lora_core.inspect.spectra import (
    ENERGIES,
    Inspection,
    Module,
    Spectrum,
    adapter_modules,
    energy_column,
    inspect_adapter,
    rank_measures,
    spectrum,
)
from lora_core.inspect.summary import HEATMAP_VALUES, heatmap, overall, usage

__all__ = [
    "ENERGIES",
    "HEATMAP_VALUES",
    "Adapter",
    "AdapterError",
    "Comparison",
    "Inspection",
    "Module",
    "RightSize",
    "Spectrum",
    "adapter_modules",
    "check_adapter",
    "check_out_dir",
    "compare_adapters",
    "energy_column",
    "heatmap",
    "inspect_adapter",
    "open_adapter",
    "open_zip",
    "overall",
    "plan_right_size",
    "prune_unpacked",
    "rank_measures",
    "right_sized_config",
    "spectrum",
    "subspace_similarity",
    "unpack_zip",
    "usage",
    "write_right_sized",
]
