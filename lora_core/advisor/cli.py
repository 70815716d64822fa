"""`python -m lora_core advise`: the advisor's recommendation, as text or JSON."""

from __future__ import annotations

import argparse

from lora_core.advisor.advice import PRIORITIES, Advice, Case
from lora_core.advisor.advise import advise
from lora_core.advisor.evidence import READS, TASKS, load_evidence
from lora_core.advisor.figures import show
from lora_core.advisor.measure import LONGEST_QUANTILE
from lora_core.embedded import config_name
from lora_core.errors import InputError
from lora_core.memory import GIB


class AdviseInputError(InputError):
    """Flags that contradict each other."""


def add_advise_parser(commands) -> None:
    advise_parser = commands.add_parser(
        "advise",
        help="a recommended LoRA config for a model, a dataset and a GPU, with the evidence for each choice",
    )
    advise_parser.add_argument(
        "--model", required=True, help="'embedded', a catalogue id, Hub id, model folder or config.json path"
    )
    advise_parser.add_argument("--task", choices=tuple(TASKS), default="sft", help="what the run teaches")
    advise_parser.add_argument("--examples", type=int, help="training examples in the dataset")
    advise_parser.add_argument("--completion-tokens", type=float, help="mean completion (target) tokens per example")
    advise_parser.add_argument("--prompt-tokens", type=float, help="mean prompt tokens per example (default 0)")
    advise_parser.add_argument(
        "--dataset",
        help="measure a dataset instead: a built-in task or upload:PATH (JSONL/CSV), counted with the model's "
        "tokenizer where it is local, else the embedded model's",
    )
    advise_parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: prompt + completion, padded)")
    advise_parser.add_argument("--gpu-gb", type=float, default=24.0, help="GPU memory in GiB (default 24)")
    advise_parser.add_argument("--priority", choices=tuple(PRIORITIES), default="quality")
    advise_parser.add_argument("--json", action="store_true", help="the config, count, memory and claims as JSON")
    advise_parser.set_defaults(handler=cmd_advise)


def cmd_advise(args: argparse.Namespace) -> int:
    from lora_core.cli import json_text

    examples, completion, prompt, seq_len = args.examples, args.completion_tokens, args.prompt_tokens, args.seq_len
    share = None
    if args.dataset is not None:
        if examples is not None or completion is not None or prompt is not None:
            raise AdviseInputError("give --dataset or --examples/--completion-tokens/--prompt-tokens, not both")
        measured = _measure(args.dataset, args.model)
        examples, completion, prompt = measured.examples, measured.completion_tokens, measured.prompt_tokens
        if seq_len is None:
            seq_len, share = measured.long_tokens, LONGEST_QUANTILE
    elif examples is None or completion is None:
        raise AdviseInputError("give --examples N and --completion-tokens T (or --dataset to measure a file)")
    case = Case(
        config_name(args.model),  # the embedded model is advised on its catalogue config
        args.task,
        examples,
        completion,
        prompt if prompt is not None else 0.0,
        args.gpu_gb,
        args.priority,
        seq_len,
        share,
    )
    advice = advise(case)
    print(json_text(advice.to_json(), indent=2) if args.json else "\n".join(advice_lines(advice)))
    return 0


def _measure(spec: str, model: str):
    from lora_core.advisor.measure import load_tokenizer, measure_dataset
    from lora_core.training.config import EMBEDDED, TrainSetupError
    from lora_core.training.data import load_dataset

    dataset = load_dataset(spec)  # bad input fails here, before a tokenizer is loaded
    try:
        name, tokenizer = model, load_tokenizer(model)
    except TrainSetupError:  # a config only (catalogue, offline Hub id): count with the embedded model's
        name, tokenizer = EMBEDDED, load_tokenizer(EMBEDDED)
    return measure_dataset(dataset, tokenizer, name)


def advice_lines(advice: Advice) -> list[str]:
    """The recommendation as the terminal shows it: the config, then each choice with its rule,
    claims, distance from the claims' conditions and alternatives, then the claims' sources."""
    case, settings, training = advice.case, advice.settings, advice.training
    need = advice.estimate.required_bytes / GIB
    share = 100 * advice.count.trainable_params / max(advice.count.all_params, 1)
    lines = [
        f"{advice.model_id}: {TASKS[case.task]}, {_count(case.examples, 'example')} x {show(case.completion_tokens)} "
        f"completion tokens, {show(case.gpu_gib)} GiB GPU, {case.priority} first",
        f"LoRA:     {advice.choice('targets').value}, r={settings.r}, alpha={show(settings.lora_alpha)}, "
        f"rsLoRA {'on' if settings.use_rslora else 'off'}, dropout {show(settings.lora_dropout)}: "
        f"{advice.count.trainable_params:,} trainable of {advice.count.all_params:,} ({share:.2f}%)",
        f"Training: lr {show(training.learning_rate)}, {_count(training.epochs, 'epoch')}, micro-batch "
        f"{training.micro_batch} x {training.grad_accumulation} = {training.effective_batch}, "
        f"{training.seq_len:,} tokens, {_count(training.steps, 'step')}",
        f"Memory:   {'fits' if advice.fits else 'DOES NOT FIT'}: {need:.1f} GiB estimated "
        f"({_setup(advice)}) on {show(case.gpu_gib)} GiB",
        "",
    ]
    for choice in advice.choices:
        lines.append(f"{choice.name} = {choice.value}   [{', '.join(choice.claims)}]")
        lines.append(f"    {choice.rule}")
        if choice.article:
            lines.append(f"    the article says: {choice.article}")
        lines += [f"    vs conditions: {line}" for line in choice.distance]
        for alternative in choice.alternatives:
            lines.append(f"    or {alternative.value}: {alternative.when} [{', '.join(alternative.claims)}]")
    lines += ["", *[f"warning: {warning}" for warning in advice.warnings]]
    evidence = load_evidence()
    lines.append("Claims:")
    for claim_id in advice.claims_used():
        claim = evidence[claim_id]
        lines.append(f"  {claim_id}: {claim.source} ({claim.ref}); {READS[claim.read]}")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _setup(advice: Advice) -> str:
    setup = advice.setup
    parts: list[str] = ["QLoRA (NF4)" if setup.quantization == "nf4" else setup.dtype]
    if setup.gradient_checkpointing:
        parts.append("gradient checkpointing")
    return ", ".join([*parts, f"micro-batch {setup.batch_size}"])
