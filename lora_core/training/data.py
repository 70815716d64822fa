"""A run's examples: the dataset a spec names, read and checked, and the collator that batches them."""

from __future__ import annotations

from pathlib import Path

from lora_core.datasets import (
    BUILTIN_TASKS,
    IGNORE_INDEX,
    MAX_UPLOAD_BYTES,
    UPLOAD_SUFFIXES,
    DatasetError,
    builtin_dataset,
    check_hub_dataset,
    hub_dataset,
    parse_upload,
)
from lora_core.errors import one_line, short_repr


def check_dataset(spec: str, seed: int = 0) -> None:
    """Raise `DatasetError` unless `spec` can be trained on: a built-in task or an upload is read
    and parsed; a Hub dataset is only checked for its id's form and the Hub's reach (downloading
    it is the run's work, not the form's)."""
    if isinstance(spec, str) and spec.startswith("hub:"):
        check_hub_dataset(spec.removeprefix("hub:"))
        return
    load_dataset(spec, seed)


def load_dataset(spec: str, seed: int = 0):
    """A `Dataset` for a built-in task name, "upload:<path>" or "hub:<repo id>". Raises `DatasetError`."""
    if spec in BUILTIN_TASKS:
        return builtin_dataset(spec, seed=seed)
    if spec.startswith("upload:"):
        name = spec.removeprefix("upload:")
        if Path(name).suffix.lower() not in UPLOAD_SUFFIXES:  # before the disk: /etc/passwd is not read
            raise DatasetError(f"{short_repr(name)}: use a .jsonl or .csv file")
        try:
            path = Path(name).expanduser()
            if not path.is_file():
                what = "is not a file" if path.exists() else "does not exist"
                raise DatasetError(f"dataset file {short_repr(name)} {what}: give a JSONL or CSV file")
            if path.stat().st_size > MAX_UPLOAD_BYTES:
                raise DatasetError(
                    f"dataset file {path} is over {MAX_UPLOAD_BYTES // 1_000_000} MB: use a smaller sample"
                )
            data = path.read_bytes()
        except (OSError, RuntimeError) as error:  # unreadable, a name too long, ~nosuchuser
            raise DatasetError(f"dataset file {short_repr(name)} cannot be read ({one_line(error)})") from None
        return parse_upload(data, path.name, seed=seed)
    if spec.startswith("hub:"):
        return hub_dataset(spec.removeprefix("hub:"), seed=seed)
    raise DatasetError(
        f"unknown dataset {spec!r}: a built-in task ({', '.join(BUILTIN_TASKS)}), upload:PATH or hub:REPO"
    )


def collator(tokenizer):
    """transformers' `DataCollatorForSeq2Seq` for tokenized examples (input_ids, labels): pads each
    batch to its longest example on the tokenizer's padding side (`load_model_and_tokenizer` sets
    it to the right), input_ids with the pad token, labels with -100, and adds the attention mask."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
