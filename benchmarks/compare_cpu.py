"""Compares two runs of ``benchmarks/cpu.py``: the same cases, before and after a change.

For each case of both JSON files it prints the paired ratio ATen time / our time of each run
(the median over rounds of ``aten_i / ours_i``, ATen measured in the same round as ours, so a
machine that is slower in one run cancels out), their quotient (``after / before``: 1 means
unchanged), and each run's A/A control (ATen against itself), which shows how far noise alone
moves a ratio. The summary gives the range and geometric mean of the quotients.

Run: ``python benchmarks/compare_cpu.py BEFORE.json AFTER.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any


def paired(record: dict[str, Any], numerator: str, denominator: str) -> float | None:
    """Median over rounds of ``numerator_i / denominator_i`` (``None`` if a provider is absent)."""
    providers = record["providers"]
    if numerator not in providers or denominator not in providers:
        return None
    top, bottom = providers[numerator]["times_ms"], providers[denominator]["times_ms"]
    return statistics.median(a / b for a, b in zip(top, bottom, strict=False))


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return (tuple(record["shape"]), record["layout"], record["dtype"], record["pass"])


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case present in both runs."""
    old = {_key(r): r for r in before["records"]}
    rows = []
    for record in after["records"]:
        previous = old.get(_key(record))
        if previous is None:
            continue
        ratio_before = paired(previous, "aten", "ours")
        ratio_after = paired(record, "aten", "ours")
        if ratio_before is None or ratio_after is None:
            continue
        rows.append(
            {
                "case": _key(record),
                "before": ratio_before,
                "after": ratio_after,
                "after/before": ratio_after / ratio_before,
                "control_before": paired(previous, "aten-control", "aten"),
                "control_after": paired(record, "aten-control", "aten"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Prints the table and the summary; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    rows = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    print("case | ATen/ours before | after | after/before | A/A before | A/A after")
    for row in rows:
        shape, layout, dtype, pass_name = row["case"]
        name = f"{'x'.join(map(str, shape))} {layout[:6]} {dtype} {pass_name}"
        controls = [row["control_before"], row["control_after"]]
        control = " | ".join("-" if c is None else f"{c:.2f}" for c in controls)
        print(
            f"{name:42s} | {row['before']:.2f} | {row['after']:.2f} | "
            f"{row['after/before']:.3f} | {control}"
        )
    if rows:
        quotients = [row["after/before"] for row in rows]
        geomean = math.exp(sum(math.log(q) for q in quotients) / len(quotients))
        print(
            f"{len(rows)} cases: after/before {min(quotients):.3f}–{max(quotients):.3f}, "
            f"geomean {geomean:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
