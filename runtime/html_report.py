"""A validation report as one self-contained HTML file with inline SVG plots.

The file has no external resource (no script, font, stylesheet or image link), so it can be
mailed or archived as it is. Plots are inline SVG drawn here: a plotting library would be a
heavy dependency for three kinds of bar chart. It shows the verdict and its checks, a table of
per-output metrics, a histogram of absolute errors per output, bars of size on disk and of
throughput for both models, and the localization table (every row; the worst ten highlighted).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxpress.atomic import atomic_open
from onnxpress.report import human_bytes
from onnxpress.runtime.metrics import HISTOGRAM_EDGES, OutputMetrics
from onnxpress.runtime.validate import ValidationReport

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child,td.t,th.t{text-align:left}th{background:#f5f5f5}
.pass{color:#137333;font-weight:bold}.fail{color:#c5221f;font-weight:bold}.warn{color:#b06000}
tr.worst td{background:#fff4e5}figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.9em;color:#555}
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def bar_chart(labels: list[str], values: list[float], *, title: str, fmt: Callable[[float], str],
              width: int = 420, color: str = "#4c78a8") -> str:
    """A horizontal bar chart as inline SVG."""
    row, left, right = 28, 110, 90
    height = row * len(labels) + 30
    top = max(values, default=0.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{_esc(title)}</title>']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 20 + i * row
        w = max(1.0, (width - left - right) * value / top)
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" font-size="12">{_esc(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row - 8}" fill="{color}"/>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 15}" font-size="12">{_esc(fmt(value))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def error_histogram(metrics: OutputMetrics, width: int = 520, height: int = 200) -> str:
    """The absolute-error histogram of one output (log-spaced bins, exact matches first) as inline SVG."""
    counts = metrics.histogram.astype(np.int64)
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return "<p>(no elements compared)</p>"
    lo, hi = int(nonzero.min()), int(nonzero.max())
    bins = list(range(lo, hi + 1))
    total = counts.sum()
    left, bottom, top_pad = 40, 40, 16
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    bar_w = plot_w / len(bins)
    peak = counts[bins].max()
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>absolute error of {_esc(metrics.name)}</title>',
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#999"/>']
    for i, b in enumerate(bins):
        h = plot_h * counts[b] / peak if peak else 0
        x = left + i * bar_w
        label = "exact" if b == 0 else f"≤{HISTOGRAM_EDGES[b]:.0e}"
        parts.append(f'<rect x="{x + 1:.1f}" y="{top_pad + plot_h - h:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{"#59a14f" if b == 0 else "#e15759"}">'
                     f'<title>{_esc(label)}: {counts[b]} ({100 * counts[b] / total:.2f}%)</title></rect>')
        if len(bins) <= 12 or i % max(1, len(bins) // 8) == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height - 22}" font-size="10" text-anchor="middle">'
                         f'{_esc(label)}</text>')
    parts.append(f'<text x="{left}" y="{height - 5}" font-size="11">|reference − candidate| per element '
                 f'(bin upper edge; {total} elements)</text></svg>')
    return "".join(parts)


def render_html(report: ValidationReport) -> str:
    """The report as one HTML document."""
    verdict = "PASS" if report.passed else "FAIL"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>onnxpress validation: {verdict}</title><style>{_STYLE}</style></head><body>",
           f'<h1>Validation: <span class="{verdict.lower()}">{verdict}</span></h1>',
           f"<p>reference <code>{_esc(report.reference.path)}</code><br>candidate "
           f"<code>{_esc(report.candidate.path)}</code><br>data <code>{_esc(report.data)}</code>: "
           f"{report.samples} samples, batch size {report.batch_size}</p>"]
    out.extend(f'<p class="warn">warning: {_esc(w)}</p>' for w in report.warnings)
    out.append('<h2>Checks</h2><table id="checks"><tr><th>check</th><th>value</th><th>limit</th><th>result</th></tr>')
    for c in report.checks:
        cls = "pass" if c.passed else "fail"
        out.append(f"<tr><td>{_esc(c.name)}</td><td>{_fmt(c.value, '.6g')}</td><td>{_fmt(c.limit, 'g')}</td>"
                   f'<td class="{cls}">{"pass" if c.passed else "FAIL"}</td></tr>')
    out.append("</table>")
    out.append('<h2>Outputs</h2><table id="outputs"><tr><th>output</th><th>max abs</th><th>mean abs</th>'
               "<th>rel L2</th><th>mean cosine</th><th>min cosine</th><th>top-1 agreement</th><th>SQNR dB</th></tr>")
    for name, m in report.outputs.items():
        if m.shape_mismatch:
            out.append(f'<tr><td>{_esc(name)}</td><td colspan="7" class="fail">shapes differ: '
                       f"{_esc(m.shape_mismatch)}</td></tr>")
            continue
        top1 = "-" if m.top1_agreement is None else f"{m.top1_agreement:.2f}%"
        out.append(f"<tr><td>{_esc(name)}</td><td>{_fmt(m.max_abs_error)}</td><td>{_fmt(m.mean_abs_error)}</td>"
                   f"<td>{_fmt(m.rel_l2_error)}</td><td>{m.mean_cosine:.6f}</td><td>{m.min_cosine:.6f}</td>"
                   f"<td>{top1}</td><td>{m.sqnr_db:.1f}</td></tr>")
    out.append("</table><h2>Error histograms</h2>")
    for name, m in report.outputs.items():
        out.append(f"<figure>{error_histogram(m)}<figcaption>{_esc(name)}</figcaption></figure>")
    out.append("<h2>Models</h2><table id=\"models\"><tr><th>model</th><th>size on disk</th><th>samples/s</th>"
               "<th>accuracy</th></tr>")
    for label, run in (("reference", report.reference), ("candidate", report.candidate)):
        out.append(f"<tr><td>{label}</td><td>{human_bytes(run.size_bytes)}</td>"
                   f"<td>{_fmt(run.samples_per_second, '.1f')}</td>"
                   f"<td>{'-' if run.accuracy is None else f'{run.accuracy:.2f}%'}</td></tr>")
    out.append("</table>")
    out.append("<figure>" + bar_chart(["reference", "candidate"],
                                      [report.reference.size_bytes, report.candidate.size_bytes],
                                      title="size on disk", fmt=human_bytes) +
               f"<figcaption>size on disk (ratio {_fmt(report.size_ratio, '.3f')}x)</figcaption></figure>")
    if report.speedup is not None:
        out.append("<figure>" + bar_chart(["reference", "candidate"],
                                          [report.reference.samples_per_second or 0.0,
                                           report.candidate.samples_per_second or 0.0],
                                          title="throughput", fmt=lambda v: f"{v:,.0f}/s", color="#f28e2b") +
                   f"<figcaption>samples/s at batch {report.batch_size}, median of {report.speed_repeats} runs "
                   f"(speedup {report.speedup:.3f}x)</figcaption></figure>")
    if report.localization is not None:
        out.append(f"<h2>Localization</h2><p>{len(report.localization)} nodes, ranked by the noise-to-signal power "
                   "each adds when fed the reference's exact inputs (node SQNR); span: the reference nodes the row covers (the worst ten highlighted).</p>")
        out.append('<table id="localization"><tr><th>#</th><th class="t">node</th><th class="t">op</th>'
                   '<th class="t">output</th><th class="t">candidate op</th><th>SQNR in dB</th><th>SQNR out dB</th>'
                   '<th>node SQNR dB</th><th>added NSR</th><th>rel L2</th><th class="t">span</th></tr>')
        for i, e in enumerate(report.localization, start=1):
            cls = ' class="worst"' if i <= 10 else ""
            out.append(f"<tr{cls}><td>{i}</td><td class=\"t\">{_esc(e.node or '<unnamed>')}</td>"
                       f"<td class=\"t\">{_esc(e.op_type)}</td><td class=\"t\">{_esc(e.output)}</td>"
                       f"<td class=\"t\">{_esc(e.candidate_op_type)}</td><td>{e.sqnr_in_db:.1f}</td>"
                       f"<td>{e.sqnr_out_db:.1f}</td><td>{e.node_sqnr_db:.1f}</td><td>{e.added_error:.3g}</td>"
                       f"<td>{e.rel_l2_error:.3g}</td><td class=\"t\">{_esc(', '.join(e.span))}</td></tr>")
        out.append("</table>")
    out.append(f"<p><small>onnxpress validation, {report.seconds:.2f}s</small></p></body></html>")
    return "\n".join(out)


def write_html(report: ValidationReport, path: str | os.PathLike[str]) -> Path:
    """Writes :func:`render_html` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))
    return Path(path)
