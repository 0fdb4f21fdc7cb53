"""Question sets for scaling strategies: a seeded arithmetic task and GSM8K-format JSONL files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from forkllm.scaling.extract import normalize_number

INSTRUCTION = "Solve it step by step, one short line per step, and end with the final number."


@dataclass
class Problem:
    question: str
    answer: str


def arithmetic_task(count: int, seed: int = 0) -> list[Problem]:
    """Two-operand integer problems ("What is 17 + 25?"), seeded."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        op = rng.choice(["+", "-", "+", "*"])
        a, b = (
            (rng.randint(2, 99), rng.randint(2, 99))
            if op != "*"
            else (rng.randint(2, 19), rng.randint(2, 12))
        )
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(Problem(f"What is {a} {op} {b}?", str(value)))
    return out


def gsm8k_file(path: str | Path, count: int | None = None) -> list[Problem]:
    """JSONL lines with "question" and "answer" ending in "#### <number>"."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{i + 1}: each line needs 'question' and 'answer'")
            gold = str(row["answer"]).split("####")[-1].strip()
            out.append(Problem(row["question"], normalize_number(gold)))
            if count is not None and len(out) >= count:
                break
    return out
