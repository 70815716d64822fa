"""A tiny randomly initialised causal LM with its own small tokenizer, saved to a folder: seconds
to train, no downloads."""

from __future__ import annotations

from pathlib import Path


def build_tiny_causal_lm(folder: Path) -> Path:
    """Save a 2-layer Llama (hidden 32) and a byte-level BPE tokenizer trained on the built-in
    tasks' text into `folder`; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lora_core.datasets import BUILTIN_TASKS, builtin_dataset

    folder.mkdir(parents=True, exist_ok=True)
    corpus = [e.prompt + " " + e.completion for task in BUILTIN_TASKS for e in builtin_dataset(task, 300, 10).train]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_train_config(model: Path, **changes):
    """A `TrainConfig` on the tiny model that trains in about a second: 3 steps of 2 x 64 tokens,
    evaluated at step 2 and at the end on 8 examples."""
    from lora_core.training import TrainConfig

    base = {
        "model": str(model),
        "dataset": "reverse_list",
        "steps": 3,
        "eval_every": 2,
        "eval_examples": 8,
        "batch_size": 2,
        "seq_len": 64,
        "learning_rate": 1e-2,
    }
    return TrainConfig(**{**base, **changes})


def build_nan_model(tiny_model: Path, folder: Path) -> Path:
    """The tiny model with its final norm set to NaN, saved to `folder`: every loss it gives is NaN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder
