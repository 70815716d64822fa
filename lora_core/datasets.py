"""Training data: built-in tasks generated here, uploads (JSONL/CSV), and Hub datasets when online.

Every source becomes a list of `Example(prompt, completion)` (prompt empty for plain text) split
into train and eval. `tokenize_examples` applies the tokenizer's chat template when it has one
and masks the prompt so the loss is on completions only.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_core.errors import InputError, short_repr

MAX_UPLOAD_BYTES = 20_000_000
UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv")  # .json holds JSON Lines too
MIN_EXAMPLES = 8
IGNORE_INDEX = -100


class DatasetError(InputError):
    """A dataset that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Dataset:
    name: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    description: str = ""


# --- built-in tasks ---------------------------------------------------------------------------

_NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jonas", "Kaori", "Lena"]
_NAMES += ["Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara"]
_CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Dublin", "Perth", "Sofia", "Accra"]
_CITIES += ["Tunis", "Seoul", "Porto", "Riga", "Dhaka", "Bern", "Kyiv", "Doha"]
_WORDS = ["apple", "river", "stone", "cloud", "ember", "maple", "orbit", "pearl", "quartz", "raven", "tulip", "violet"]
_WORDS += ["willow", "yarrow", "zephyr", "amber", "birch", "cedar", "delta", "falcon", "garnet", "harbor", "iris"]
_TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "{name} ({age}) moved to {city} last spring.",
    "Age {age}, based in {city}: that is {name}.",
]


def _json_extraction(rng: random.Random) -> Example:
    name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 90)
    sentence = rng.choice(_TEMPLATES).format(name=name, age=age, city=city)
    prompt = f"Extract the person's name, age and city as JSON.\nText: {sentence}"
    return Example(prompt, json.dumps({"name": name, "age": age, "city": city}))


def _reverse_list(rng: random.Random) -> Example:
    items = rng.sample(_WORDS, rng.randint(3, 6))
    prompt = f"Reverse the order of this list: {', '.join(items)}"
    return Example(prompt, ", ".join(reversed(items)))


def _date_format(rng: random.Random) -> Example:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    prompt = f"Rewrite the date {year:04d}-{month:02d}-{day:02d} in the format DD/MM/YYYY."
    return Example(prompt, f"{day:02d}/{month:02d}/{year:04d}")


BUILTIN_TASKS = {
    "json_extraction": (_json_extraction, "Sentences about a person -> a fixed JSON object (format learning)."),
    "reverse_list": (_reverse_list, "A comma-separated list -> the same list reversed (a skill, not knowledge)."),
    "date_format": (_date_format, "ISO dates -> DD/MM/YYYY (a deterministic rewrite)."),
}


def builtin_dataset(name: str, train_size: int = 2000, eval_size: int = 64, seed: int = 0) -> Dataset:
    """A built-in task, deterministic for `seed`, with disjoint train and eval examples."""
    if name not in BUILTIN_TASKS:
        raise DatasetError(f"unknown built-in task {name!r}: choose one of {', '.join(BUILTIN_TASKS)}")
    make, description = BUILTIN_TASKS[name]
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    for _ in range((train_size + eval_size) * 20):
        example = make(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
        if len(examples) == train_size + eval_size:
            break
    return Dataset(name, tuple(examples[eval_size:]), tuple(examples[:eval_size]), description)


# --- uploads ----------------------------------------------------------------------------------


def parse_upload(data: bytes, filename: str, eval_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """A Dataset from an uploaded JSONL or CSV file with columns `text`, or `prompt`/`completion`,
    or `instruction`/`output` (plus optional `input`). Raises `DatasetError` with one line."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise DatasetError(
            f"{filename} is {len(data) / 1e6:.1f} MB; uploads are capped at {MAX_UPLOAD_BYTES / 1e6:.0f} MB"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{filename} is not UTF-8 text: save it as UTF-8 JSONL or CSV") from None
    suffix = Path(filename).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise DatasetError(f"{filename}: use a .jsonl or .csv file")
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(text, filename)
    elif suffix == ".csv":
        try:
            rows = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as error:  # e.g. a field over csv.field_size_limit(), a NUL byte
            raise DatasetError(f"{filename}: not a readable CSV file ({error}); save it as plain CSV") from None
    return split_examples(Path(filename).stem, rows_to_examples(rows, filename), eval_fraction, seed)


def _jsonl_rows(text: str, filename: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{filename} line {number}: not valid JSON ({error.msg}); one JSON object per line"
            ) from None
        except RecursionError:
            raise DatasetError(f"{filename} line {number}: JSON nested too deeply; one flat object per line") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{filename} line {number}: each line must be a JSON object")
        rows.append(row)
    return rows


def rows_to_examples(rows: list[dict], source: str) -> list[Example]:
    """Examples from dict rows; the column set decides the shape (see `parse_upload`)."""
    if not rows:
        raise DatasetError(f"{source} has no rows")
    columns = set(rows[0])
    if {"prompt", "completion"} <= columns:
        pick = lambda row: (row.get("prompt"), row.get("completion"))  # noqa: E731
    elif {"instruction", "output"} <= columns:
        pick = lambda row: (_instruction(row), row.get("output"))  # noqa: E731
    elif "text" in columns:
        pick = lambda row: ("", row.get("text"))  # noqa: E731
    else:
        raise DatasetError(
            f"{source}: columns {sorted(columns)} do not fit; use `text`, or `prompt` and `completion`, "
            "or `instruction` and `output`"
        )
    examples = []
    for number, row in enumerate(rows, 1):
        prompt, completion = pick(row)
        if not isinstance(completion, str) or not completion.strip() or not isinstance(prompt, str):
            raise DatasetError(
                f"{source} row {number}: empty, missing or non-text value; every row needs text in each column"
            )
        if not (_encodable(prompt) and _encodable(completion)):  # JSON's "\ud800" decodes to a lone surrogate
            raise DatasetError(
                f"{source} row {number}: text that is not valid Unicode (a lone surrogate); fix its escapes"
            )
        examples.append(Example(prompt, completion))
    if len(examples) < MIN_EXAMPLES:
        raise DatasetError(f"{source} has {len(examples)} rows; at least {MIN_EXAMPLES} are needed for train and eval")
    return examples


def _encodable(text: str) -> bool:
    """Whether a tokenizer can take `text`: str that UTF-8 can encode (a lone surrogate cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _instruction(row: dict) -> Any:
    instruction, extra = row.get("instruction"), row.get("input")
    if not isinstance(instruction, str):
        return instruction  # refused as non-text by the caller
    return f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction


def split_examples(name: str, examples: list[Example], eval_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """A seeded shuffle split into train and eval (at least one eval example, at most 256)."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    eval_size = min(256, max(1, int(len(shuffled) * eval_fraction)))
    return Dataset(name, tuple(shuffled[eval_size:]), tuple(shuffled[:eval_size]), f"{len(shuffled)} rows from {name}")


def hub_dataset_id(text: str) -> str:
    """`text` as a Hub dataset id, by the Hub's own rule (owner/name). Raises `DatasetError`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = text.strip()
    if not name:
        raise DatasetError("give a Hub dataset id")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise DatasetError(
            f"{short_repr(name)} is not a Hub dataset id: owner/name of letters, digits, '-', '_' and '.', "
            "at most 96 characters"
        ) from None
    return name


def check_hub_dataset(text: str) -> str:
    """The Hub dataset id in `text` when it is well-formed and the Hub answers; raises
    `DatasetError` otherwise (downloading it is the run's work)."""
    from lora_core.models import hub_reachable

    repo_id = hub_dataset_id(text)
    if not hub_reachable():
        raise DatasetError(f"{repo_id!r}: the Hub is unreachable; use a built-in task or upload a JSONL/CSV file")
    return repo_id


def hub_dataset(repo_id: str, eval_fraction: float = 0.1, seed: int = 0, max_rows: int = 20_000) -> Dataset:
    """A Hub dataset repo's first train split file (JSONL, CSV or Parquet). Raises `DatasetError`
    offline or when no usable file is found."""
    repo_id = check_hub_dataset(repo_id)
    import pandas as pd
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        files = list_repo_files(repo_id, repo_type="dataset")
    except Exception as error:
        raise DatasetError(f"{repo_id!r} is not a readable Hub dataset ({type(error).__name__})") from None
    usable = [f for f in files if f.endswith((".jsonl", ".csv", ".parquet"))]
    usable.sort(key=lambda f: ("train" not in f.lower(), len(f)))
    if not usable:
        raise DatasetError(f"{repo_id!r} has no JSONL, CSV or Parquet file")
    path = hf_hub_download(repo_id, usable[0], repo_type="dataset")
    reader = {".jsonl": lambda p: pd.read_json(p, lines=True), ".csv": pd.read_csv, ".parquet": pd.read_parquet}
    frame = reader[Path(path).suffix](path).head(max_rows)
    return split_examples(repo_id, rows_to_examples(frame.to_dict(orient="records"), repo_id), eval_fraction, seed)


# --- tokenization -----------------------------------------------------------------------------


def tokenize_examples(examples, tokenizer, seq_len: int) -> list[dict]:
    """input_ids / labels per example, truncated to `seq_len`. With a prompt, the chat template
    (when the tokenizer has one) frames it as a user turn and the loss covers the completion only."""
    eos = tokenizer.eos_token or ""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    encoded = []
    for example in examples:
        if example.prompt:
            if has_template:
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
                )
            else:
                prompt = f"{example.prompt}\n"
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(example.completion + eos, add_special_tokens=False)["input_ids"]
            input_ids = (prompt_ids + completion_ids)[:seq_len]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:seq_len]
        else:
            input_ids = tokenizer(example.completion + eos, add_special_tokens=False)["input_ids"][:seq_len]
            labels = list(input_ids)
        if any(label != IGNORE_INDEX for label in labels):
            encoded.append({"input_ids": input_ids, "labels": labels})
    if not encoded:
        raise DatasetError(f"no example keeps a completion token within {seq_len} tokens: raise the sequence length")
    return encoded
