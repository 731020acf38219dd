"""The raw samples of one run, and the table made of them: medians, ratios, targets, verdicts.

A `Row` is a timing or a figure measured on several servers: its medians per server, the
ratios bridge/native and bridge/imapc, targets as ratios to another server (so they hold on
any machine) and/or a bound on the bridge's own figure. A `Fact` is a row its scenario
module judged itself from one sample (e.g. "every session completed, every deletion reached
the store"). Each becomes a line of the Markdown table and an entry of the JSON verdicts.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024
TARGET_NAMES = ("native", "imapc", "bridge")


def progress(text: str) -> None:
    """Where a long run is (seeding, storms): stderr, so the table on stdout stays clean."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


class Recorder:
    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))

    def add(self, metric: str, target: str, value: Any) -> None:
        self.samples[metric][target].append(value)

    def values(self, metric: str, target: str) -> list[Any]:
        return list(self.samples.get(metric, {}).get(target, []))

    def median(self, metric: str, target: str, key: str | None = None) -> float | None:
        values = [v[key] if key else v for v in self.values(metric, target)]
        values = [v for v in values if v is not None]  # e.g. no latency: every session failed
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class Row:
    label: str
    metric: str
    key: str | None
    scale: float
    higher_is_better: bool
    # (against, limit): the subject's ratio to server `against` must stay within `limit`.
    targets: tuple[tuple[str, float], ...]
    # Whose figure is the "bridge" column (e.g. "bridge_w2", a bridge with two workers).
    subject: str = "bridge"
    # A limit on the subject's own figure (after `scale`), e.g. 1024 (MiB).
    bound: float | None = None
    unit: str = ""
    # What the other servers' columns hold when it is not the same figure (e.g. "PSS sum").
    note: str = ""
    # How the target text names a server that has no column (e.g. "bridge, workers = 1").
    against_text: str = ""
    digits: int = 1


@dataclass(frozen=True)
class Fact:
    label: str
    bridge: str
    target: str
    met: bool | None
    detail: dict[str, Any] = field(default_factory=dict)
    native: str = ""
    imapc: str = ""


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _within(value: float | None, limit: float, higher_is_better: bool) -> bool:
    return value is not None and (value >= limit if higher_is_better else value <= limit)


def _verdict_text(met: list[bool]) -> str:
    if not met:
        return "—"
    return "yes" if all(met) else "**no**"


def _row_line(rec: Recorder, row: Row, verdicts: list[dict[str, Any]]) -> str:
    values = {name: rec.median(row.metric, name, row.key) for name in ("native", "imapc")}
    values["bridge"] = rec.median(row.metric, row.subject, row.key)
    ratios = {name: ratio(values["bridge"], values[name]) for name in ("native", "imapc")}
    sign = "≥" if row.higher_is_better else "≤"
    met: list[bool] = []
    texts: list[str] = []
    for against, limit in row.targets:
        value = ratios[against] if against in ratios else ratio(values["bridge"], rec.median(row.metric, against, row.key))
        ok = _within(value, limit, row.higher_is_better)
        met.append(ok)
        verdicts.append({"row": row.label, "against": against, "limit": limit, "ratio": value, "met": ok})
        text = f"{sign} {limit}× {row.against_text or against}"
        if against not in ratios:
            text += f" (now {fmt(value, digits=2)}×)"
        texts.append(text)
    if row.bound is not None:
        value = None if values["bridge"] is None else values["bridge"] * row.scale
        ok = _within(value, row.bound, row.higher_is_better)
        met.append(ok)
        verdicts.append({"row": row.label, "bound": row.bound, "value": value, "met": ok})
        texts.append(f"{sign} {row.bound:,g}{row.unit}")
    target = ", ".join(texts) or "(reported)"
    if row.note:
        target += f"; {row.note}"
    return (
        f"| {row.label} | {fmt(values['native'], row.scale, row.digits)} "
        f"| {fmt(values['imapc'], row.scale, row.digits)} "
        f"| {fmt(values['bridge'], row.scale, row.digits)} | {fmt(ratios['native'], digits=2)} "
        f"| {fmt(ratios['imapc'], digits=2)} | {target} | {_verdict_text(met)} |"
    )


def summarise(rec: Recorder, rows: list[Row | Fact]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown table and the verdicts. A Row none of whose servers was measured (its
    group did not run) is left out."""
    lines = [
        "| measurement | native | imapc | bridge | bridge/native | bridge/imapc | target | met |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    verdicts: list[dict[str, Any]] = []
    for row in rows:
        if isinstance(row, Fact):
            verdicts.append({"row": row.label, "met": row.met, **row.detail})
            met = "—" if row.met is None else ("yes" if row.met else "**no**")
            lines.append(
                f"| {row.label} | {row.native} | {row.imapc} | {row.bridge} | | | {row.target} | {met} |"
            )
        elif rec.samples.get(row.metric):
            lines.append(_row_line(rec, row, verdicts))
    return "\n".join(lines), verdicts
