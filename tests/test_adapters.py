"""A saved adapter's spectra, pinned to the PEFT model that wrote it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from lora_core.adapters import effective_ranks


@pytest.mark.parametrize("use_rslora", [False, True])
def test_each_module_scale_and_spectrum_are_those_of_the_peft_model(tmp_path, use_rslora) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    lora = LoraConfig(
        r=5,
        lora_alpha=7,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 3},
        alpha_pattern={"v_proj": 3},
        use_rslora=use_rslora,
        init_lora_weights=False,  # B is not zero, so each update has a spectrum
    )
    model = get_peft_model(LlamaForCausalLM(config), lora)
    model.save_pretrained(tmp_path)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}

    summary, spectra = effective_ranks(tmp_path)
    assert sorted(summary["module"]) == sorted(layers)
    for row in summary.itertuples():
        layer = layers[row.module]
        assert row.scale == layer.scaling["default"], row.module
        update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        expected = torch.linalg.svdvals(update.detach().double()).numpy()[: row.rank]
        ours = spectra.loc[spectra["module"] == row.module, "singular_value"].to_numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-5)
