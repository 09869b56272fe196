"""Writes the lab's outputs: ``results.json`` (every number), ``report.md`` and ``report.html``
(each claim next to its plot, its measured numbers and, where an experiment has one, its block of
text such as the worked example), and the short claims → effect table printed at the end of a
run.

Numbers are printed by :func:`format_value` everywhere, so a value in ``results.json`` appears
in the reports exactly as ``format_value`` renders it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from batchnorm.lab.experiments import ExperimentResult

__all__ = ["claims_table", "format_value", "write_html", "write_json", "write_markdown"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
section { display: flex; gap: 2em; align-items: flex-start; border-top: 1px solid #ccc;
          padding: 1em 0; }
section .text { flex: 1 1 40%; } section img { flex: 1 1 60%; max-width: 60%; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #a33; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def format_value(value: Any) -> str:
    """How a number is shown in the reports: 4 significant digits, ``–`` for None."""
    if value is None:
        return "–"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(path: Path, results: Sequence[ExperimentResult], meta: dict[str, Any]) -> None:
    """Writes ``{"meta": …, "experiments": {key: result fields}}`` to ``path``."""
    document = {"meta": meta, "experiments": {r.key: asdict(r) for r in results}}
    path.write_text(json.dumps(document, indent=1, allow_nan=True) + "\n", encoding="utf-8")


def _cell(text: str) -> str:
    """Text for a cell of a Markdown table: its pipes escaped (``|Δ|`` would end the cell)."""
    return text.replace("|", "\\|")


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    return [f"{key}: {format_value(value)}" for key, value in meta.items()]


def write_markdown(path: Path, results: Sequence[ExperimentResult], meta: dict[str, Any]) -> None:
    """Writes the Markdown report: the summary table, then each claim, plot and numbers."""
    lines = ["# Batch normalization lab", ""]
    lines += [f"- {line}" for line in _meta_lines(meta)]
    lines += ["", "| # | claim | source | measured |", "|---|---|---|---|"]
    for number, result in enumerate(results, 1):
        lines.append(
            f"| {number} | {_cell(result.title)} | {_cell(result.source)} | "
            f"{_cell(result.effect)} |"
        )
    for number, result in enumerate(results, 1):
        lines += ["", f"## {number}. {result.title}", ""]
        lines += [f"**Claim** ({result.source}): {result.claim}", ""]
        lines += [f"**Measured**: {result.effect}", ""]
        if result.figure:
            lines += [f"![{result.title}]({result.figure})", ""]
        if result.text:
            lines += ["```text", result.text, "```", ""]
        lines += ["| quantity | value |", "|---|---:|"]
        lines += [
            f"| {_cell(key)} | {_cell(format_value(value))} |"
            for key, value in result.summary.items()
        ]
        lines += [""] + [f"> Note: {note}" for note in result.notes]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def write_html(path: Path, results: Sequence[ExperimentResult], meta: dict[str, Any]) -> None:
    """Writes the HTML report: one section per claim, text and numbers beside the plot."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Batch normalization lab</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Batch normalization lab</h1><ul>",
        *(f"<li>{escape(line)}</li>" for line in _meta_lines(meta)),
        "</ul><table><tr><th>#</th><th>claim</th><th>source</th><th>measured</th></tr>",
    ]
    for number, result in enumerate(results, 1):
        parts.append(
            f'<tr><td>{number}</td><td><a href="#{escape(result.key)}">{escape(result.title)}</a>'
            f"</td><td>{escape(result.source)}</td><td>{escape(result.effect)}</td></tr>"
        )
    parts.append("</table>")
    for number, result in enumerate(results, 1):
        rows = "".join(
            f'<tr><td>{escape(key)}</td><td class="number">{escape(format_value(value))}</td></tr>'
            for key, value in result.summary.items()
        )
        notes = "".join(f'<p class="note">Note: {escape(note)}</p>' for note in result.notes)
        text = f"<pre>{escape(result.text)}</pre>" if result.text else ""
        image = (
            f'<img src="{escape(result.figure)}" alt="{escape(result.title)}">'
            if result.figure
            else ""
        )
        parts.append(
            f'<section id="{escape(result.key)}"><div class="text">'
            f"<h2>{number}. {escape(result.title)}</h2>"
            f"<p><b>Claim</b> ({escape(result.source)}): {escape(result.claim)}</p>"
            f"<p><b>Measured</b>: {escape(result.effect)}</p>"
            f"<table>{rows}</table>{notes}{text}</div>{image}</section>"
        )
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def claims_table(results: Sequence[ExperimentResult]) -> str:
    """The short table printed at the end of a run: claim → measured effect."""
    width = max((len(r.title) for r in results), default=5)
    lines = [f"{'claim':<{width}}  measured effect", f"{'-' * width}  {'-' * 15}"]
    lines += [f"{r.title:<{width}}  {r.effect}" for r in results]
    return "\n".join(lines)
