"""Benchmark rows, the markdown table, and the saved JSON/markdown files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Row:
    system: str
    dtype: str
    metrics: dict[str, float]  # e.g. {"output_tok_s": 512.3}
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def table(
    rows: list[Row],
    columns: list[tuple[str, str]],
    baseline: Row | None,
    ratio_key: str,
    higher_is_better: bool = True,
    speedup_of: list[Row] | None = None,
) -> str:
    """A markdown table. `baseline`: a column of each row's ratio to it; `speedup_of`: a column per
    given row (forkllm's) of its speed over each row's, by `ratio_key` (above 1: that row faster)."""
    refs = speedup_of or []
    head = ["system", "dtype"] + [title for _, title in columns]
    if baseline is not None:
        head.append(f"ratio vs {baseline.system} {baseline.dtype}")
    head += [f"{ref.system} {ref.dtype} speed / this" for ref in refs]
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.system, r.dtype]
        for key, _ in columns:
            v = r.metrics.get(key)
            cells.append("" if v is None else f"{v:,.2f}" if abs(v) < 100 else f"{v:,.1f}")
        if baseline is not None:
            b, v = baseline.metrics.get(ratio_key), r.metrics.get(ratio_key)
            if b and v:
                cells.append(f"{(v / b if higher_is_better else b / v):.2f}x")
            else:
                cells.append("")
        for ref in refs:
            f, v = ref.metrics.get(ratio_key), r.metrics.get(ratio_key)
            cells.append(f"{(f / v if higher_is_better else v / f):.2f}x" if f and v else "")
        cells.append(r.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(out_dir: str | Path, workload: str, markdown: str, rows: list[Row], extra: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = out / f"{workload}-{stamp}.md"
    md.write_text(markdown + "\n")
    payload = {"workload": workload, "machine": machine_info(), "rows": [asdict(r) for r in rows], **extra}
    (out / f"{workload}-{stamp}.json").write_text(json.dumps(payload, indent=2))
    return md
