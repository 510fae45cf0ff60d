"""The build report: report.json (everything measured) and report.html (the same, for a person to read).

Pure: `report_json`/`report_html` take the report dictionary and return text; `class_breakdown` (per-class
accuracy and confusion matrices from labels and outputs) and `manifest_sections` (the signature and what the device
holds the bundle to) compute report sections from arrays and the manifest. The HTML is self-contained (inline SVG,
no scripts, no fetches).

What a reader should not have to work out: the metric chart's axis starts near the data (a dot plot, with the gate
drawn), so 98.33 and 98.06 do not look equal; per-class accuracy and a confusion matrix for classification; the
input/output signature with the bundle's preprocessing and class names; the parity and latency budget the device
enforces; the host's processor in words; and, when an int8 artifact is slower or barely smaller than fp32, a
sentence on why.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.bundle import Manifest

_COLORS = {"fp32": "#7f8c8d", "onnx": "#2e86de", "tflite": "#e67e22"}
MAX_CONFUSION_CLASSES = 100  # a full matrix in report.json up to this many classes; the most frequent pairs beyond
MAX_HTML_MATRIX = 30  # drawn as a table up to this many classes
MAX_CLASS_ROWS = 50  # per-class rows shown in the HTML (the worst int8 drops first beyond it)
TOP_CONFUSIONS = 20
TINY_MODEL_MS = 0.2  # a batch-1 fp32 call this fast is mostly per-call overhead
SMALL_FILE_BYTES = 512 << 10


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


# --- sections computed from arrays and the manifest --------------------------------------------------------------


def class_breakdown(labels: np.ndarray, outputs: Mapping[str, np.ndarray],
                    names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class accuracy (percent; None for a class with no evaluation sample) and confusion matrices (rows: true
    class, columns: predicted) of each model's outputs on the evaluation set; `names` are the class names if any.
    Beyond MAX_CONFUSION_CLASSES classes only the TOP_CONFUSIONS most frequent (true, predicted) pairs are kept."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    classes = max(int(np.asarray(o).reshape(len(y), -1).shape[1]) for o in outputs.values())
    support = np.bincount(y, minlength=classes)
    section: dict[str, Any] = {
        "classes": classes, "names": list(names) if names is not None else [str(i) for i in range(classes)],
        "support": support.tolist(), "accuracy": {}, "confusion": {}, "top_confusions": {}}
    for model, out in outputs.items():
        pred = np.argmax(np.asarray(out).reshape(len(y), -1), axis=1)
        correct = np.bincount(y[pred == y], minlength=classes)
        section["accuracy"][model] = [round(100.0 * int(c) / int(s), 4) if s else None
                                      for c, s in zip(correct, support, strict=True)]
        matrix = np.bincount(y * classes + pred, minlength=classes * classes).reshape(classes, classes)
        if classes <= MAX_CONFUSION_CLASSES:
            section["confusion"][model] = matrix.tolist()
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(-off, axis=None, kind="stable")[:TOP_CONFUSIONS]
        section["top_confusions"][model] = [
            {"true": int(i // classes), "predicted": int(i % classes), "count": int(off.flat[i])}
            for i in flat if off.flat[i] > 0]
    return section


def manifest_sections(manifest: Manifest) -> dict[str, Any]:
    """`signature` (inputs, outputs, preprocessing, class names) and `device` (parity, latency budget, batch and
    memory bounds the agent enforces) from the manifest as written."""
    def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
        return [s.to_json() for s in specs]

    prep = manifest.preprocess
    signature: dict[str, Any] = {
        "inputs": tensors(manifest.inputs), "outputs": tensors(manifest.outputs),
        "artifacts": {a.format: {"inputs": tensors(a.inputs), "outputs": tensors(a.outputs)}
                      for a in manifest.artifacts},
        "preprocessing": prep.to_json() if prep is not None else None,
        "labels": ({"output": manifest.labels.output, "count": len(manifest.labels.names),
                    "scores": manifest.labels.scores, "first": list(manifest.labels.names[:10])}
                   if manifest.labels is not None else None),
    }
    device = {"parity": dict(manifest.parity), "latency_budget_ms": manifest.latency_budget_ms,
              "max_batch": manifest.max_batch, "min_ram_mb": manifest.target.get("min_ram_mb"),
              "arch": manifest.target.get("arch")}
    return {"signature": signature, "device": device}


# --- sentences ---------------------------------------------------------------------------------------------------


def host_in_words(host: Mapping[str, Any]) -> str:
    """The build machine's processor as a sentence: model, architecture, cores, and what it has for int8."""
    cpu = str(host.get("cpu") or host.get("machine") or "an unknown processor")
    machine = str(host.get("machine") or "")
    cores = host.get("cores")
    isa = set(host.get("int8_isa") or [])
    where = ", ".join(p for p in (machine, f"{cores} cores" if cores else "") if p)
    if machine in ("x86_64", "AMD64", "i686"):
        if isa & {"avx512_vnni", "avx_vnni", "amx_int8"}:
            kit = "it has VNNI int8 dot-product instructions, so int8 matrix products run at full width"
        elif "avx2" in isa:
            kit = ("it has AVX2 but no VNNI: int8 products are summed in pairs in 16 bits, which is why the ONNX "
                   "weights use 7 bits (they cannot saturate)")
        else:
            kit = "it has no AVX2: int8 kernels gain little over float here"
    elif machine in ("aarch64", "arm64"):
        parts = (["dot-product (SDOT/UDOT)"] if "asimddp" in isa else []) + (["I8MM"] if "i8mm" in isa else [])
        kit = (f"it has Arm int8 {' and '.join(parts)} instructions" if parts
               else "it has no Arm int8 dot-product instructions")
    else:
        kit = f"int8 instructions found: {', '.join(sorted(isa)) or 'none'}"
    threads = host.get("threads")
    return (f"Built and timed on {cpu}" + (f" ({where})" if where else "") + f"; {kit}. Timings are at batch 1"
            + (f" with {threads} runtime thread(s)" if threads else "") + " on this machine: the device measures its "
            "own when it stages the bundle.")


def int8_notes(report: Mapping[str, Any]) -> list[str]:
    """One sentence per int8 artifact that is slower than fp32, barely faster, or barely smaller, saying why."""
    fp32 = report["fp32"]
    notes = []
    for a in report.get("artifacts", []):
        size_x = a["bytes"] / fp32["bytes"] if fp32.get("bytes") else math.nan
        speed_x = a["p50_ms"] / fp32["p50_ms"] if fp32.get("p50_ms") else math.nan
        slow, big = speed_x >= 0.9, size_x >= 0.5
        if not (slow or big):
            continue
        what = []
        if slow:
            what.append("slower than fp32" if speed_x > 1.0 else "barely faster than fp32")
        if big:
            what.append("barely smaller")
        why = []
        if slow and fp32["p50_ms"] < TINY_MODEL_MS:
            why.append(f"at {fp32['p50_ms']:.3f} ms per fp32 call the model is tiny, so batch-1 time goes to per-call "
                       "overhead (the runtime call, quantizing the input, dequantizing the output), not to the "
                       "arithmetic int8 speeds up")
        elif slow:
            why.append("the quantize/dequantize steps around layers kept in float, or int8 kernels this processor "
                       "runs slowly (see the processor below), cost what int8 arithmetic saved")
        if big and fp32["bytes"] < SMALL_FILE_BYTES:
            why.append("a small file is mostly what int8 does not shrink: the graph, per-channel scales and zero "
                       "points, int32 biases and metadata")
        elif big:
            why.append("weights kept in float (by the recipe, or never quantized) count at full size: see the recipe")
        notes.append(f"{a['format']} int8 is {' and '.join(what)} ({size_x:.2f}x the fp32 bytes, {speed_x:.2f}x its "
                     f"batch-1 p50 latency: {a['p50_ms']:.3f} vs {fp32['p50_ms']:.3f} ms): {'; '.join(why)}.")
    return notes


def _parity_words(parity: Mapping[str, Any]) -> str:
    kind = parity.get("kind")
    if kind == "top1":
        return (f"the device's run of the golden inputs must pick the same class as the packager's on at least "
                f"{100 * float(parity.get('min_agreement', 0)):.0f}% of them")
    if kind == "cosine":
        return f"the device's golden outputs must have cosine at least {parity.get('min')} to the packager's"
    if kind == "tolerance":
        return (f"the device's golden outputs must match the packager's within atol {parity.get('atol')} and rtol "
                f"{parity.get('rtol')}")
    return html.escape(json.dumps(dict(parity)))


# --- charts and tables -------------------------------------------------------------------------------------------


def _bar_chart(title: str, unit: str, bars: list[tuple[str, float]], fmt: str = "{:.3g}") -> str:
    """Bars from zero, for quantities where length is the point (bytes, milliseconds)."""
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


def axis_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(start, end, tick step) of an axis that starts near the data: the values' span plus a margin, on round
    numbers, so a difference of a few tenths fills a visible part of the axis."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0, 0.25
    lo, hi = min(finite), max(finite)
    span = hi - lo or max(abs(hi) * 0.01, 1e-6)
    raw_step = span * 1.3 / 4
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    start = math.floor((lo - span * 0.15) / step) * step
    end = math.ceil((hi + span * 0.15) / step) * step
    return start, end, step


def _dot_chart(title: str, points: list[tuple[str, float]], gate: tuple[str, float] | None,
               fmt: str = "{:.4g}") -> str:
    """A dot per model on an axis that starts near the data (not at zero), the gate as a dashed line."""
    width, row_h, label_w, right = 520, 30, 90, 70
    values = [v for _, v in points] + ([gate[1]] if gate is not None else [])
    start, end, step = axis_range(values)
    plot_w = width - label_w - right
    axis_y = 36 + len(points) * row_h
    height = axis_y + 40

    def x_of(v: float) -> float:
        return label_w + plot_w * (v - start) / (end - start)

    rows = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(title)}">',
            f'<text x="0" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
            f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" stroke="#555"/>']
    n_ticks = round((end - start) / step)
    for t in range(n_ticks + 1):
        v = start + t * step
        x = x_of(v)
        rows.append(f'<line x1="{x:.1f}" y1="28" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#e3e3e3"/>')
        rows.append(f'<text x="{x:.1f}" y="{axis_y + 18}" font-size="11" text-anchor="middle">{v:.6g}</text>')
    if gate is not None and math.isfinite(gate[1]):
        x = x_of(gate[1])
        rows.append(f'<line x1="{x:.1f}" y1="28" x2="{x:.1f}" y2="{axis_y}" stroke="#c0392b" stroke-dasharray="4 3"/>')
        rows.append(f'<text x="{x:.1f}" y="{axis_y + 32}" font-size="11" fill="#c0392b" text-anchor="middle">'
                    f'{html.escape(gate[0])} {gate[1]:.4g}</text>')
    for i, (label, value) in enumerate(points):
        y = 36 + i * row_h + row_h / 2
        color = _COLORS.get(label.split(" ")[0], "#16a085")
        rows.append(f'<text x="0" y="{y + 4:.1f}" font-size="12">{html.escape(label)}</text>')
        if math.isfinite(value):
            x = x_of(value)
            rows.append(f'<line x1="{label_w}" y1="{y:.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            rows.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{color}"/>')
            rows.append(f'<text x="{x + 10:.1f}" y="{y + 4:.1f}" font-size="12">{html.escape(fmt.format(value))}'
                        '</text>')
    rows.append("</svg>")
    return "\n".join(rows)


def _num(v: Any, fmt: str = "{:.4g}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else ("" if v is None else str(v))


def _pruning_html(prune: Mapping[str, Any], metric: str, fp32: Mapping[str, Any]) -> str:
    before_after = [_num(prune.get("value_before")), _num(prune.get("value_after")), _num(prune.get("drop"))]
    if prune.get("method") == "channels":  # structured (packager/prune.py): whole channels gone
        ft = prune.get("finetune") or {}
        tuned = (f"{ft.get('epochs')} epochs on {ft.get('samples')} samples"
                 + (" with labels" if ft.get("labels") else "")) if ft else "none"
        p50 = prune.get("p50_ms")
        speed = f"{p50 / fp32['p50_ms']:.2f}x" if isinstance(p50, (int, float)) and fp32.get("p50_ms") else ""
        table = _table(["channels removed", "parameters before", "parameters after", "layers", "fine-tune",
                        f"fp32 {metric} before", f"fp32 {metric} after", "drop", "bytes x fp32", "p50 x fp32"],
                       [[_num(prune.get("amount")), _num(prune.get("parameters_before"), "{:,}"),
                         _num(prune.get("parameters_after"), "{:,}"), _num(prune.get("layers")), tuned,
                         *before_after, f"{prune['bytes'] / fp32['bytes']:.3f}" if prune.get("bytes") else "", speed]])
        text = ("<p>Whole channels were removed, so the pruned model is smaller and faster as a dense file. Every "
                "drop in this report, pruning's and each int8 artifact's, is measured from the unpruned model.</p>")
    else:
        table = _table(["amount", "sparsity", f"fp32 {metric} before", f"fp32 {metric} after", "drop"],
                       [[_num(prune.get("amount")), _num(prune.get("sparsity"), "{:.3f}"), *before_after]])
        text = ("<p>Every drop in this report, pruning's and each int8 artifact's, is measured from the unpruned "
                "model. Unstructured zeros do not shrink a dense int8 file; compare the zstd column to see what "
                "they buy on the wire.</p>")
    return "<h2>Pruning</h2>" + table + text


def _distillation_html(d: Mapping[str, Any], metric: str) -> str:
    """The record `packager distill` leaves in the student (packager/distill.py): teacher against student."""
    teacher, student, training = d.get("teacher") or {}, d.get("student") or {}, d.get("training") or {}
    m = d.get("metric", metric)
    rows = [[role, sec.get("model", ""), _num(sec.get("parameters"), "{:,}"), _num(sec.get("onnx_bytes"), "{:,}"),
             _num(sec.get("p50_ms"), "{:.3f}"), _num(sec.get("value")), _num(sec.get("drop"))]
            for role, sec in (("teacher", teacher), ("student", student))]
    table = _table(["", "model", "parameters", "fp32 ONNX bytes", "p50 ms", str(m), "drop"], rows)
    tp, sp = teacher.get("parameters"), student.get("parameters")
    ratio = (f" The student has {sp / tp:.3f}x the teacher's parameters." if isinstance(tp, (int, float))
             and isinstance(sp, (int, float)) and tp else "")
    how = ", ".join(f"{k} {training[k]}" for k in ("epochs", "temperature", "alpha", "samples", "labels")
                    if k in training)
    return (f"<h2>Distillation</h2>{table}<p>This model is a student distilled from the teacher above"
            f"{' (' + html.escape(how) + ')' if how else ''}.{ratio} The gate in this report measures the "
            "student as the source model; the teacher's figures are from <code>packager distill</code>.</p>")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _classes_html(section: Mapping[str, Any]) -> str:
    names, support = section["names"], section["support"]
    models = list(section["accuracy"])
    acc = section["accuracy"]
    base = models[0]  # fp32
    order = list(range(section["classes"]))
    note = ""
    if len(order) > MAX_CLASS_ROWS:  # the classes int8 hurt most first
        def worst(i: int) -> float:
            drops = [(acc[base][i] or 0) - (acc[m][i] or 0) for m in models[1:]]
            return -max(drops, default=0.0)
        order = sorted(order, key=worst)[:MAX_CLASS_ROWS]
        note = (f"<p>{MAX_CLASS_ROWS} of {section['classes']} classes shown: those int8 lost most on; report.json "
                "has all.</p>")
    headers = ["class", "name", "samples", *(f"{m} %" for m in models),
               *(f"{m} vs {base}" for m in models[1:])]
    rows = []
    for i in order:
        deltas = ["" if acc[m][i] is None or acc[base][i] is None else f"{acc[m][i] - acc[base][i]:+.1f}"
                  for m in models[1:]]
        rows.append([i, names[i] if i < len(names) else "", support[i], *(_pct(acc[m][i]) for m in models), *deltas])
    out = "<h2>Per-class accuracy (evaluation set)</h2>" + note + _table(headers, rows)
    for model in models[1:]:
        matrix = section["confusion"].get(model)
        if matrix is not None and section["classes"] <= MAX_HTML_MATRIX:
            out += f"<h3>Confusion matrix: {html.escape(model)} (rows: true class, columns: predicted)</h3>"
            out += _matrix_html(matrix, names)
        elif section["top_confusions"].get(model):
            out += f"<h3>Most frequent confusions: {html.escape(model)}</h3>" + _table(
                ["true", "predicted as", "count"],
                [[names[c["true"]], names[c["predicted"]], c["count"]] for c in section["top_confusions"][model]])
    return out


def _matrix_html(matrix: list[list[int]], names: Sequence[str]) -> str:
    head = "<th></th>" + "".join(f"<th>{html.escape(str(n))}</th>" for n in names)
    body = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            share = count / total
            color = f"rgba(46,134,222,{share:.2f})" if i == j else f"rgba(192,57,43,{min(1.0, 3 * share):.2f})"
            cells.append(f'<td style="background:{color}">{count or ""}</td>')
        body.append(f"<tr><th>{html.escape(str(names[i]))}</th>{''.join(cells)}</tr>")
    return f'<table class="matrix"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _signature_html(sig: Mapping[str, Any] | None, device: Mapping[str, Any] | None) -> str:
    out = ""
    if sig:
        rows = [["input", t["name"], t["shape"], t["dtype"]] for t in sig["inputs"]]
        rows += [["output", t["name"], t["shape"], t["dtype"]] for t in sig["outputs"]]
        out += "<h2>Signature</h2>" + _table(["", "name", "shape (-1: any)", "dtype"], rows)
        for fmt, art in sig.get("artifacts", {}).items():
            quant = [f"{t['name']}: {t['quantized_dtype']} scale {t['scale']:.6g} zero point {t['zero_point']}"
                     for t in [*art["inputs"], *art["outputs"]] if t.get("scale") is not None]
            if quant:
                out += (f"<p>{html.escape(fmt)} artifact tensors are quantized inside; the agent converts, callers "
                        f"send and receive floats ({html.escape('; '.join(quant))}).</p>")
        prep = sig.get("preprocessing")
        if prep:
            steps = [f"clients send {prep['input']!r} raw in {prep['layout']} layout ({prep['dtype']})"]
            if prep.get("resize"):
                steps.append(f"any height and width, resized on the device ({prep['resize']})")
            steps.append(f"the device computes (x * {prep['scale']:.6g} - mean) / std with mean {prep['mean']} and "
                         f"std {prep['std']}")
            if prep["layout"] != prep["model_layout"]:
                steps.append(f"then transposes to {prep['model_layout']}")
            out += "<p>Preprocessing on the device: " + html.escape("; ".join(steps)) + ". A client that sends " \
                "model-ready data sets <code>parameters.preprocessed</code> to true.</p>"
        else:
            out += "<p>No preprocessing declared: clients send inputs exactly as in the evaluation data.</p>"
        labels = sig.get("labels")
        if labels:
            scores = "softmax probabilities" if labels["scores"] == "softmax" else "the output's own values"
            out += (f"<p>Class names: {labels['count']} for output {html.escape(repr(labels['output']))} (first: "
                    f"{html.escape(', '.join(labels['first']))}); answers with <code>parameters.classification</code> "
                    f"name the top classes with {scores} as scores.</p>")
    if device:
        out += ("<h2>What the device holds it to</h2><ul>"
                f"<li>Parity when staged: {html.escape(_parity_words(device.get('parity', {})))}.</li>"
                f"<li>Latency: p95 at most {device.get('latency_budget_ms'):g} ms during probation.</li>"
                f"<li>At most {device.get('max_batch')} rows per request; at least {device.get('min_ram_mb')} MB of "
                f"RAM; architectures {html.escape(', '.join(device.get('arch') or []))}.</li></ul>")
    return out


def report_html(report: dict[str, Any]) -> str:
    fp32, artifacts = report["fp32"], report["artifacts"]
    metric = report["metric"]
    models = [("fp32", fp32), *((a["format"] + " int8", a) for a in artifacts)]
    prune = report.get("pruning")
    pruned = [("fp32 pruned", prune)] if prune and "bytes" in prune else []
    size = _bar_chart("Size", "KiB", [(n, m["bytes"] / 1024) for n, m in [*models[:1], *pruned, *models[1:]]])
    gate = None
    if report["task"] in ("classification", "embedding"):
        gate = ("gate", fp32["value"] - float(report["max_drop"]))
    points = [(n, float(m["value"])) for n, m in models]
    if prune and "value_after" in prune:
        points.insert(1, ("fp32 pruned", float(prune["value_after"])))
    acc = _dot_chart(f"{metric} on the evaluation set (axis starts near the data)", points, gate)
    timed = [*models[:1], *((n, m) for n, m in pruned if "p50_ms" in m), *models[1:]]
    lat = _bar_chart("Host latency p50, batch 1", "ms", [(n, m["p50_ms"]) for n, m in timed], "{:.3f}")
    rows = [[n, m["bytes"], m.get("zstd_bytes", ""), f"{m['bytes'] / fp32['bytes']:.3f}", f"{m['value']:.4g}",
             f"{m.get('drop', 0.0):.4g}", m["p50_ms"], m["p95_ms"]] for n, m in models]
    if prune and "drop" in prune:  # pruning's own loss, measured like every artifact's: from the unpruned model
        rows.insert(1, ["fp32 pruned", prune["bytes"], prune.get("zstd_bytes", ""),
                        f"{prune['bytes'] / fp32['bytes']:.3f}", f"{prune['value_after']:.4g}", f"{prune['drop']:.4g}",
                        prune.get("p50_ms", ""), prune.get("p95_ms", "")])
    summary = _table(["model", "bytes", "zstd bytes", "x fp32", metric, "drop", "p50 ms", "p95 ms"], rows)
    notes = "".join(f"<p class=\"note\">{html.escape(str(n))}</p>"
                    for n in [*report.get("notes", []), *int8_notes(report)])
    recipe_rows = []
    for a in artifacts:
        for t in a.get("trials", []):
            status = "chosen" if t["recipe"] == a.get("recipe") else ("pass" if t["passed"] else "miss")
            if t.get("error"):
                status = "error: " + t["error"]
            elif t.get("why"):  # a reason besides accuracy (size, latency): see /work/notes/issue15-report.md
                status += ": " + str(t["why"])
            recipe_rows.append([a["format"], t["recipe"].get("name", ""), t["bytes"], f"{t['value']:.4g}",
                                f"{t['drop']:.4g}", status])
    recipes = _table(["format", "recipe", "bytes", metric, "drop", "result"], recipe_rows)
    prune_html = _pruning_html(prune, metric, fp32) if prune else ""
    distill_html = _distillation_html(report["distillation"], metric) if report.get("distillation") else ""
    classes = _classes_html(report["classes"]) if report.get("classes") else ""
    signature = _signature_html(report.get("signature"), report.get("device"))
    title = f"{report['name']} v{report['version']}"
    verdict = html.escape(report.get("verdict", ""))
    host = report.get("host", {})
    host_words = html.escape(host_in_words({**host, "threads": report.get("threads")}))
    machine = html.escape(json.dumps(host))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeship build report: {html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 64em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; font-size: 13px; }}
th:first-child, td:first-child {{ text-align: left; }}
table.matrix td, table.matrix th {{ padding: 2px 6px; min-width: 1.5em; text-align: center; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
.note {{ background: #fff8e1; padding: 0.5em 1em; border-left: 4px solid #f1c40f; }}
</style></head><body>
<h1>edgeship build report: {html.escape(title)}</h1>
<p>Task: {html.escape(report['task'])}; metric: {html.escape(metric)}; gate: drop at most
{report['max_drop']}. {verdict}</p>
{summary}
{notes}
<div class="charts">{acc}{size}{lat}</div>
{signature}
{classes}
<h2>Recipes tried</h2>
{recipes}
{prune_html}
{distill_html}
<h2>Host</h2><p>{host_words}</p><p><code>{machine}</code></p>
</body></html>
"""
