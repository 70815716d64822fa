"""The chosen config, in the forms training stacks take as is: PEFT adapter_config.json, a full JSON
with context, Axolotl and LLaMA-Factory YAML fragments, and a runnable Python snippet."""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from lora_core.counting import count_lora_params
from lora_core.models import Inventory, as_inventory
from lora_core.settings import ALL_LINEAR, LoraSettings, LoraSettingsError

Format = Literal["peft", "json", "axolotl", "llamafactory", "python"]
FORMATS: tuple[Format, ...] = get_args(Format)
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
        return _yaml(axolotl_config(settings, inv.spec.model_id, _targets_list(settings, inv)))
    if fmt == "llamafactory":
        return _yaml(llamafactory_config(settings, inv.spec.model_id, _targets_list(settings, inv)))
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
    if targets == ALL_LINEAR:
        return ALL_LINEAR
    adapted, _ = matched_module_names(inv, settings)  # a regex: the tools take names, so list them
    return sorted({name.rsplit(".", 1)[-1] for name in adapted})


def axolotl_config(settings: LoraSettings, model_id: str, targets: list[str] | str) -> dict[str, Any]:
    """The Axolotl LoRA keys for `settings`, with `targets` as `_targets_list` gives them."""
    config: dict[str, Any] = {
        "base_model": model_id,
        "adapter": "lora",
        "lora_r": settings.r,
        "lora_alpha": _num(settings.lora_alpha),
        "lora_dropout": _num(settings.lora_dropout),
    }
    if targets == ALL_LINEAR:
        config["lora_target_linear"] = True
    else:
        config["lora_target_modules"] = list(targets)
    if settings.use_rslora:
        config["peft_use_rslora"] = True
    if settings.use_dora:
        config["peft_use_dora"] = True
    if settings.modules_to_save:
        config["lora_modules_to_save"] = list(settings.modules_to_save)
    if settings.layers_to_transform is not None:
        layers = settings.layers_to_transform
        config["peft_layers_to_transform"] = list(layers) if isinstance(layers, tuple) else [layers]
    return config


def llamafactory_config(settings: LoraSettings, model_id: str, targets: list[str] | str) -> dict[str, Any]:
    """The LLaMA-Factory LoRA keys for `settings`: its `lora_target` and `additional_target` are
    comma-separated strings, and "all" is its all-linear."""
    config: dict[str, Any] = {
        "model_name_or_path": model_id,
        "finetuning_type": "lora",
        "lora_rank": settings.r,
        "lora_alpha": _num(settings.lora_alpha),
        "lora_dropout": _num(settings.lora_dropout),
        "lora_target": "all" if targets == ALL_LINEAR else ",".join(targets),
    }
    if settings.use_rslora:
        config["use_rslora"] = True
    if settings.use_dora:
        config["use_dora"] = True
    if settings.modules_to_save:
        config["additional_target"] = ",".join(settings.modules_to_save)
    return config


def _yaml(config: dict[str, Any]) -> str:
    """YAML that `yaml.safe_load` reads back as `config`: PyYAML quotes every value that would
    otherwise read as another type or break the line (`yes`, `null`, `1e3`, `a: b`, `# c`)."""
    import yaml

    class IndentedDumper(yaml.SafeDumper):
        """Lists indented under their key (`  - q_proj`), as the tools' own example configs are."""

        def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
            return super().increase_indent(flow, False)

    return yaml.dump(
        config, Dumper=IndentedDumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1 << 16
    )


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


def _num(value: float) -> int | float:
    """A whole number as an int (`lora_alpha: 32`, as the tools' own examples write it)."""
    return int(value) if float(value).is_integer() else float(value)
