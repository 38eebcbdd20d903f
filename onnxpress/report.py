"""Human tables and JSON reports of a compress run.

Every command prints through this module, so it imports onnx-ir (0.6 s) only where a
function needs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxpress.atomic import atomic_open

if TYPE_CHECKING:
    import onnx_ir as ir

    from onnxpress.pipeline import StepRecord
    from onnxpress.stats import ModelStats


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(before: ModelStats, after: ModelStats, file_before: int | None, file_after: int | None) -> str:
    """The before/after table that ``compress`` prints."""
    def change(a: float, b: float) -> str:
        return f"{(b - a) / a * 100:+.1f}%" if a else "-"

    rows = [["", "before", "after", "change"]]
    rows.append(["nodes", str(before.nodes), str(after.nodes), change(before.nodes, after.nodes)])
    rows.append(["constants", str(before.constants), str(after.constants), change(before.constants, after.constants)])
    rows.append(["constant bytes", human_bytes(before.constant_bytes), human_bytes(after.constant_bytes),
                 change(before.constant_bytes, after.constant_bytes)])
    if file_before is not None and file_after is not None:
        rows.append(["file size", human_bytes(file_before), human_bytes(file_after), change(file_before, file_after)])
    return format_table(rows)


def steps_table(records: list[StepRecord]) -> str:
    """One line per step: time, nodes and constant bytes before and after."""
    rows = [["step", "seconds", "nodes", "constant bytes", "changed"]]
    for r in records:
        rows.append([
            f"{r.index}. {r.pass_name}" if r.round == 1 else f"{r.index}. {r.pass_name} (round {r.round})",
            f"{r.seconds:.3f}",
            f"{r.before.nodes} -> {r.after.nodes}",
            f"{human_bytes(r.before.constant_bytes)} -> {human_bytes(r.after.constant_bytes)}",
            "yes" if r.modified else "no",
        ])
    return format_table(rows)


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Writes JSON atomically (temporary file beside the target, then rename)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def model_file_bytes(path: str | os.PathLike[str], model: ir.Model) -> int:
    """Size on disk of a model file plus every external data file it names."""
    import onnx_ir as ir

    from onnxpress.graphs import constant_tensors

    path = Path(path)
    locations = {
        str(t.location) for _, t in constant_tensors(model) if isinstance(t, ir.ExternalTensor)
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)
