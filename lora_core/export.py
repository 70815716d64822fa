"""The chosen config, in the forms training stacks take as is: PEFT adapter_config.json, a full JSON
with context, Axolotl and LLaMA-Factory YAML fragments, and a runnable Python snippet."""

from __future__ import annotations

import json
from typing import Any, Literal

from lora_core.counting import count_lora_params
from lora_core.models import Inventory, as_inventory
from lora_core.settings import LoraSettings, LoraSettingsError

Format = Literal["peft", "json", "axolotl", "llamafactory", "python"]
FORMATS: tuple[str, ...] = ("peft", "json", "axolotl", "llamafactory", "python")
FILE_NAMES = {
    "peft": "adapter_config.json",
    "json": "lora-explorer.json",
    "axolotl": "axolotl-lora.yaml",
    "llamafactory": "llamafactory-lora.yaml",
    "python": "lora_config.py",
}


def export(settings: LoraSettings, model: str | Inventory, fmt: Format) -> str:
    """`settings` for `model` in format `fmt`. Raises `LoraSettingsError` when the settings do not
    count on the model (exports are always of a config the model accepts)."""
    inv = as_inventory(model)
    result = count_lora_params(inv, settings)
    if fmt == "peft":
        data = settings.to_peft_dict()
        if inv.spec.source in ("catalogue", "hub"):
            data["base_model_name_or_path"] = inv.spec.model_id
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    if fmt == "json":
        return json.dumps(full_json(settings, inv, result), indent=2, sort_keys=True) + "\n"
    if fmt == "axolotl":
        return _axolotl(settings, inv)
    if fmt == "llamafactory":
        return _llamafactory(settings, inv)
    if fmt == "python":
        return _python(settings, inv)
    raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def full_json(settings: LoraSettings, inv: Inventory, result) -> dict[str, Any]:
    """Settings plus the context they were chosen in."""
    from lora_core import __version__

    return {
        "lora_explorer_version": __version__,
        "model": inv.spec.model_id,
        "model_type": inv.model_type,
        "settings": settings.to_peft_dict(),
        "trainable_params": result.trainable_params,
        "all_params": result.all_params,
        "base_params": result.base_params,
        "percent_trainable": round(result.percent_trainable, 6),
        "effective_scale": settings.scaling(),
        "adapted_modules": len(result.modules),
        "adapter_size_mb": {"fp32": result.trainable_params * 4 / 1e6, "fp16_bf16": result.trainable_params * 2 / 1e6},
    }


def import_config(text: str | bytes) -> tuple[LoraSettings, list[str], str | None]:
    """Settings from an adapter_config.json or a full JSON export; returns (settings, unknown keys,
    model id named in the file or None). Raises `LoraSettingsError` naming the field."""
    from lora_core.settings import parse_json, unknown_keys

    data = parse_json(text)
    if isinstance(data, dict) and isinstance(data.get("settings"), dict) and "lora_explorer_version" in data:
        model = data.get("model")
        data = data["settings"]
    else:
        model = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    model = model if isinstance(model, str) and model.strip() else None
    settings = LoraSettings.from_peft_dict(data)
    problems = settings.problems()
    if problems:
        raise LoraSettingsError(problems)
    return settings, unknown_keys(data), model


def _targets_list(settings: LoraSettings, inv: Inventory) -> list[str] | str:
    from lora_core.counting import matched_module_names

    targets = settings.target_modules
    if isinstance(targets, tuple):
        return list(targets)
    if targets == "all-linear":
        return "all-linear"
    adapted, _ = matched_module_names(inv, settings)  # a regex: the tools take names, so list them
    return sorted({name.rsplit(".", 1)[-1] for name in adapted})


def _yaml_list(values: list[str]) -> str:
    return "\n".join(f"  - {v}" for v in values)


def _axolotl(settings: LoraSettings, inv: Inventory) -> str:
    targets = _targets_list(settings, inv)
    lines = [
        f"base_model: {inv.spec.model_id}",
        "adapter: lora",
        f"lora_r: {settings.r}",
        f"lora_alpha: {_num(settings.lora_alpha)}",
        f"lora_dropout: {_num(settings.lora_dropout)}",
    ]
    if targets == "all-linear":
        lines.append("lora_target_linear: true")
    else:
        lines += ["lora_target_modules:", _yaml_list(targets)]
    if settings.use_rslora:
        lines.append("peft_use_rslora: true")
    if settings.use_dora:
        lines.append("peft_use_dora: true")
    if settings.modules_to_save:
        lines += ["lora_modules_to_save:", _yaml_list(list(settings.modules_to_save))]
    if settings.layers_to_transform is not None:
        layers = settings.layers_to_transform
        lines.append(f"peft_layers_to_transform: {list(layers) if isinstance(layers, tuple) else [layers]}")
    return "\n".join(lines) + "\n"


def _llamafactory(settings: LoraSettings, inv: Inventory) -> str:
    targets = _targets_list(settings, inv)
    lines = [
        f"model_name_or_path: {inv.spec.model_id}",
        "finetuning_type: lora",
        f"lora_rank: {settings.r}",
        f"lora_alpha: {_num(settings.lora_alpha)}",
        f"lora_dropout: {_num(settings.lora_dropout)}",
        f"lora_target: {'all' if targets == 'all-linear' else ','.join(targets)}",
    ]
    if settings.use_rslora:
        lines.append("use_rslora: true")
    if settings.use_dora:
        lines.append("use_dora: true")
    if settings.modules_to_save:
        lines.append(f"additional_target: {','.join(settings.modules_to_save)}")
    return "\n".join(lines) + "\n"


def _python(settings: LoraSettings, inv: Inventory) -> str:
    data = settings.to_peft_dict()
    defaults = LoraSettings().to_peft_dict()
    keep = {k: v for k, v in data.items() if v != defaults.get(k) and k not in ("peft_type", "task_type")}
    keep.setdefault("r", settings.r)
    keep.setdefault("lora_alpha", settings.lora_alpha)
    args = ",\n".join(f"    {k}={v!r}" for k, v in sorted(keep.items()))
    loader = "AutoModelForCausalLM" if inv.model_class.endswith(("ForCausalLM", "LMHeadModel")) else "AutoModel"
    return (
        "import torch\n"
        f"from transformers import AutoConfig, {loader}\n"
        "from peft import LoraConfig, get_peft_model\n\n"
        f"config = LoraConfig(\n{args},\n)\n"
        f"# From the Hub: model = {loader}.from_pretrained({inv.spec.model_id!r})\n"
        "# Here the model is built on the meta device from its config, so the snippet runs anywhere.\n"
        f"model_config = AutoConfig.for_model(**{inv.spec.config!r})\n"
        'with torch.device("meta"):\n'
        f"    model = {loader}.from_config(model_config)\n"
        "peft_model = get_peft_model(model, config)\n"
        "peft_model.print_trainable_parameters()\n"
    )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
