"""The build report: report.json (everything measured) and report.html (the same, readable, with charts).

Pure: takes the report dictionary, returns text. The HTML is self-contained (inline SVG, no scripts, no fetches).
"""

from __future__ import annotations

import html
import json
from typing import Any

_COLORS = {"fp32": "#7f8c8d", "onnx": "#2e86de", "tflite": "#e67e22"}


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


def _bar_chart(title: str, unit: str, bars: list[tuple[str, float]], fmt: str = "{:.3g}") -> str:
    width, bar_h, gap, label_w = 520, 26, 10, 90
    height = 40 + len(bars) * (bar_h + gap)
    top = max((v for _, v in bars), default=1.0) or 1.0
    rows = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(title)}">',
            f'<text x="0" y="18" font-size="14" font-weight="bold">{html.escape(title)} ({html.escape(unit)})'
            '</text>']
    for i, (label, value) in enumerate(bars):
        y = 32 + i * (bar_h + gap)
        w = max(1.0, (width - label_w - 90) * value / top)
        color = _COLORS.get(label.split(" ")[0], "#16a085")
        rows.append(f'<text x="0" y="{y + 17}" font-size="12">{html.escape(label)}</text>')
        rows.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        rows.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 17}" font-size="12">'
                    f'{html.escape(fmt.format(value))}</text>')
    rows.append("</svg>")
    return "\n".join(rows)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(report: dict[str, Any]) -> str:
    fp32, artifacts = report["fp32"], report["artifacts"]
    metric = report["metric"]
    models = [("fp32", fp32), *((a["format"] + " int8", a) for a in artifacts)]
    size = _bar_chart("Size", "KiB", [(n, m["bytes"] / 1024) for n, m in models])
    acc = _bar_chart(f"Accuracy: {metric}", metric, [(n, m["value"]) for n, m in models], "{:.4g}")
    lat = _bar_chart("Host latency p50, batch 1", "ms", [(n, m["p50_ms"]) for n, m in models], "{:.3f}")
    prune = report.get("pruning")
    rows = [[n, m["bytes"], m.get("zstd_bytes", ""), f"{m['bytes'] / fp32['bytes']:.3f}", f"{m['value']:.4g}",
             f"{m.get('drop', 0.0):.4g}", m["p50_ms"], m["p95_ms"]] for n, m in models]
    if prune and "drop" in prune:  # pruning's own loss, measured like every artifact's: from the unpruned model
        rows.insert(1, ["fp32 pruned", prune["bytes"], prune["zstd_bytes"], f"{prune['bytes'] / fp32['bytes']:.3f}",
                        f"{prune['value_after']:.4g}", f"{prune['drop']:.4g}", "", ""])
    summary = _table(["model", "bytes", "zstd bytes", "x fp32", metric, "drop", "p50 ms", "p95 ms"], rows)
    recipe_rows = []
    for a in artifacts:
        for t in a.get("trials", []):
            status = "chosen" if t["recipe"] == a.get("recipe") else ("pass" if t["passed"] else "miss")
            if t.get("error"):
                status = "error: " + t["error"]
            recipe_rows.append([a["format"], t["recipe"].get("name", ""), t["bytes"], f"{t['value']:.4g}",
                                f"{t['drop']:.4g}", status])
    recipes = _table(["format", "recipe", "bytes", metric, "drop", "result"], recipe_rows)
    prune_html = ""
    if prune:
        prune_html = "<h2>Pruning</h2>" + _table(
            ["amount", "sparsity", f"fp32 {metric} before", f"fp32 {metric} after", "drop"],
            [[prune["amount"], f"{prune['sparsity']:.3f}", f"{prune['value_before']:.4g}",
              f"{prune['value_after']:.4g}", f"{prune['drop']:.4g}" if "drop" in prune else ""]]) + (
            "<p>Every drop in this report, pruning's and each int8 artifact's, is measured from the unpruned "
            "model. Unstructured zeros do not shrink a dense int8 file; compare the zstd column to see what "
            "they buy on the wire.</p>")
    title = f"{report['name']} v{report['version']}"
    verdict = html.escape(report.get("verdict", ""))
    machine = html.escape(json.dumps(report.get("host", {})))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeship build report: {html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; font-size: 13px; }}
th:first-child, td:first-child {{ text-align: left; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
</style></head><body>
<h1>edgeship build report: {html.escape(title)}</h1>
<p>Task: {html.escape(report['task'])}; metric: {html.escape(metric)}; gate: drop at most
{report['max_drop']}. {verdict}</p>
{summary}
<div class="charts">{size}{acc}{lat}</div>
<h2>Recipes tried</h2>
{recipes}
{prune_html}
<h2>Host</h2><p><code>{machine}</code></p>
</body></html>
"""
