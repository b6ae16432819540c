"""MMLU accuracy of a causal language model on a local copy of the benchmark (Hendrycks et al.).

The layout is the original release's: ``DIR/test/<subject>_test.csv`` and, for few-shot prompts,
``DIR/dev/<subject>_dev.csv``; each row is ``question, A, B, C, D, answer`` without a header. The model
answers by the largest next-token logit among the four letters after ``Answer:``, as in the original
evaluation. Accuracy is the mean over questions (``accuracy``) and over subjects (``macro``).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LETTERS = ("A", "B", "C", "D")


def read_subject(path: Path) -> list[tuple[str, list[str], str]]:
    """Rows of one MMLU CSV as (question, four choices, answer letter)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise ValueError(f"{path}: row {i + 1} is not 'question,A,B,C,D,answer'")
            rows.append((row[0], row[1:5], row[5].strip()))
    return rows


def format_question(question: str, choices: list[str], answer: str | None = None) -> str:
    text = question + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices, strict=True))
    return text + "\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def subject_prompt(subject: str, shots: list[tuple[str, list[str], str]]) -> str:
    topic = subject.replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    return head + "".join(format_question(q, c, a) for q, c, a in shots)


@torch.no_grad()
def evaluate(
    model: Any,
    encode: Callable[[str], list[int]],
    root: str | Path,
    shots: int = 5,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``model`` (``model(input_ids=...).logits``) on every subject under ``root/test``.

    ``encode`` maps text to token ids (no special tokens added); ``limit`` caps questions per subject;
    ``progress`` shows a bar of the subjects done on stderr (57 subjects, 14k questions at full size).
    """
    root = Path(root)
    tests = sorted((root / "test").glob("*_test.csv"))
    if not tests:
        raise FileNotFoundError(f"mmlu: no test/*_test.csv under {root}")
    letter_ids = []
    for letter in LETTERS:
        ids = encode(" " + letter)
        letter_ids.append(ids[-1])  # the letter itself, whatever the tokenizer does with the space
    model.eval()
    per_subject: dict[str, float] = {}
    correct = total = 0
    from tqdm.auto import tqdm

    for path in tqdm(tests, desc="mmlu subjects", disable=not progress, leave=False, file=sys.stderr):
        subject = path.name[: -len("_test.csv")]
        dev = root / "dev" / f"{subject}_dev.csv"
        head = subject_prompt(subject, read_subject(dev)[:shots] if shots and dev.exists() else [])
        rows = read_subject(path)[:limit]
        right = 0
        for q, choices, answer in rows:
            ids = torch.tensor([encode(head + format_question(q, choices))], device=device)
            logits = model(input_ids=ids).logits[0, -1]
            pick = LETTERS[int(torch.argmax(logits[letter_ids]))]
            right += pick == answer
        per_subject[subject] = right / max(len(rows), 1)
        correct += right
        total += len(rows)
    return {
        "accuracy": correct / max(total, 1),
        "macro": sum(per_subject.values()) / len(per_subject),
        "questions": total,
        "subjects": per_subject,
    }
