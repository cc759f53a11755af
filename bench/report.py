"""The table of figures, ratios to the reference relay, and the issue's targets."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["build_rows", "markdown_table", "missed_targets"]

_NAMES = {"reference": "reference", "embedded": "embedded", "redis": "redis (2 inst.)"}


@dataclass
class Row:
    label: str
    values: dict[str, float | None]
    fmt: str = "{:.0f}"
    ratio: str | None = None  # "pct": x/ref in %, "times": x/ref as a factor
    # target name -> (requirement text, check(value, reference) -> bool)
    goals: dict[str, tuple[str, Callable[[float, float | None], bool]]] | None = None
    # other processes' CPU (% of a core) while the figure was measured, per target
    noise: dict[str, float | None] | None = None


#: Above this much CPU used by other processes (% of a core, of the 2), a verdict is marked unreliable.
BUSY = 25.0


def _get(results: dict, *path):
    node = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _kb(kib: float | None) -> float | None:
    # The target is in KB (1000 bytes); /proc gives KiB.
    return None if kib is None else kib * 1024 / 1000


def build_rows(
    all_results: dict[str, dict],
    rates: tuple[float, ...],
    memory_clients: tuple[int, ...],
    embedded_like: tuple[str, ...] = (),
) -> list[Row]:
    """The table's rows; ``embedded_like`` targets (extra wsbridge builds) get the embedded goals."""

    def each(*path, convert=lambda v: v):
        return {t: (None if _get(r, *path) is None else convert(_get(r, *path))) for t, r in all_results.items()}

    closed_noise = {
        t: max(filter(None, [v, each("closed", "other_cpu_pct").get("reference")]), default=None)
        for t, v in each("closed", "other_cpu_pct").items()
    }
    rows = [
        Row(
            "closed loop: round trips/s (100 clients, 200 outstanding)",
            each("closed", "round_trips_per_s"),
            "{:.0f}",
            "pct",
            {
                "embedded": (">= 25 % of reference", lambda v, ref: None if ref is None else v >= 0.25 * ref),
                "redis": (">= 12 % of reference", lambda v, ref: None if ref is None else v >= 0.12 * ref),
            },
            closed_noise,
        ),
        Row(
            "closed loop: server CPU per round trip (us; a busy machine disturbs it least)",
            each("closed", "server_cpu_us_per_round_trip"),
            "{:.1f}",
            "times",
        ),
        Row("closed loop: latency p50 (ms)", each("closed", "latency", "p50_ms"), "{:.2f}", "times"),
        Row("closed loop: latency p99 (ms)", each("closed", "latency", "p99_ms"), "{:.2f}", "times"),
        Row("closed loop: server CPU (% of a core)", each("closed", "server_cpu_pct"), "{:.0f}"),
        Row("closed loop: generator CPU (% of a core)", each("closed", "generator_cpu_pct"), "{:.0f}"),
        Row("closed loop: other load on the machine (% of a core)", each("closed", "other_cpu_pct"), "{:.0f}"),
    ]
    for rate, limit in zip(rates, (1.0, 2.0, *([None] * len(rates))), strict=False):
        key = f"open_{rate:g}"
        rows.append(Row(f"open loop {rate:g}/s: latency p50 (ms)", each(key, "latency", "p50_ms"), "{:.2f}", "times"))
        goal = None
        if limit is not None and rate in (500.0, 2000.0):
            goal = {"embedded": (f"<= {limit:g} ms", lambda v, ref, limit=limit: v <= limit)}
        rows.append(
            Row(
                f"open loop {rate:g}/s: latency p99 (ms)",
                each(key, "latency", "p99_ms"),
                "{:.2f}",
                "times",
                goal,
                each(key, "other_cpu_pct"),
            )
        )
        rows.append(
            Row(f"open loop {rate:g}/s: p99 from actual send (ms)", each(key, "service", "p99_ms"), "{:.2f}", "times")
        )
        rows.append(Row(f"open loop {rate:g}/s: server CPU (%)", each(key, "server_cpu_pct"), "{:.0f}"))
        rows.append(Row(f"open loop {rate:g}/s: other load on the machine (%)", each(key, "other_cpu_pct"), "{:.0f}"))
    rows += [
        Row(
            "fan-out 1 command to each of 1000 clients: last delivery, median (ms)",
            each("fanout", "delivered_median_ms"),
            "{:.1f}",
            "times",
            {"embedded": ("<= 40 ms", lambda v, ref: v <= 40.0)},
            each("fanout", "other_cpu_pct"),
        ),
        Row("fan-out: last delivery, worst of the repeats (ms)", each("fanout", "delivered_max_ms"), "{:.1f}", "times"),
        Row(
            "fan-out: all 1000 echoes back at the controller, median (ms)",
            each("fanout", "replied_median_ms"),
            "{:.1f}",
            "times",
        ),
        Row(
            "fan-out: server CPU per fan-out incl. the echoes, median (ms)",
            each("fanout", "server_cpu_ms_median"),
            "{:.1f}",
            "times",
        ),
        Row(
            # /proc counts CPU in 10 ms ticks: the mean over every repeat resolves what the median cannot.
            "fan-out: server CPU per fan-out incl. the echoes, mean of all repeats (ms)",
            each("fanout", "server_cpu_ms_mean"),
            "{:.1f}",
            "times",
        ),
        Row("fan-out: other load on the machine (%)", each("fanout", "other_cpu_pct"), "{:.0f}"),
    ]
    for count in memory_clients:
        rows.append(
            Row(
                f"memory per idle connection at {count} clients (KB)",
                each("memory", str(count), "kib_per_conn", convert=_kb),
                "{:.1f}",
                "times",
                {"embedded": ("<= 35 KB", lambda v, ref: v <= 35.0)},
            )
        )
    if memory_clients:
        top = max(memory_clients)
        rows.append(
            Row(
                f"connections open at {top} clients",
                each("memory", str(top), "open"),
                "{:.0f}",
                None,
                {"embedded": (f"= {top}", lambda v, ref, top=top: v == top)},
            )
        )
        rows.append(
            Row(
                f"server RSS with {top} clients (MB)",
                each("memory", str(top), "rss_kib", convert=lambda v: v * 1024 / 1e6),
                "{:.0f}",
            )
        )
    conns = {t: _get(r, "redis_conns") for t, r in all_results.items()}
    for count_key in sorted({k for c in conns.values() if c for k in c}, key=int):
        rows.append(
            Row(
                f"Redis connections (both instances) with {count_key} clients",
                {t: (_get(c, count_key, "total") if c else None) for t, c in conns.items()},
                "{:.0f}",
            )
        )
    if any(conns.values()):

        def _constant(v, ref, conns=conns):
            totals = {k: x["total"] for k, x in (conns.get("redis") or {}).items()}
            return len(set(totals.values())) == 1

        rows[-1].goals = {"redis": ("same at every client count", _constant)}
    rows.append(
        Row(
            "unanswered commands + error frames (all scenarios)",
            {t: _problems(r) for t, r in all_results.items()},
            "{:.0f}",
            None,
            {t: ("0", lambda v, ref: v == 0) for t in ("embedded", "redis", *embedded_like)},
        )
    )
    for row in rows:
        if row.goals and "embedded" in row.goals:
            for name in embedded_like:
                row.goals[name] = row.goals["embedded"]
    return rows


def _problems(results: dict) -> float:
    total = 0
    for value in results.values():
        if isinstance(value, dict):
            total += value.get("unanswered", 0) + value.get("errors", 0) + value.get("incomplete", 0)
    return total


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def _ratio(value, ref, mode: str | None) -> str:
    if (
        mode is None
        or value is None
        or ref in (None, 0)
        or any(isinstance(x, float) and math.isnan(x) for x in (value, ref))
    ):
        return ""
    if mode == "pct":
        return f"{100 * value / ref:.0f} %"
    return f"{value / ref:.1f}x"


def markdown_table(rows: list[Row], targets: list[str]) -> str:
    others = [t for t in targets if t != "reference"]
    header = ["figure"]
    if "reference" in targets:
        header.append("reference")
    for t in others:
        header.append(_NAMES.get(t, t))
        if "reference" in targets:
            header.append("ratio")
    header += ["target", "met?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if all(_fmt(v, "{}") == "–" for v in row.values.values()):
            continue  # a scenario that was not run
        ref = row.values.get("reference")
        cells = [row.label]
        if "reference" in targets:
            cells.append(_fmt(ref, row.fmt))
        verdicts, goal_texts = [], []
        for t in others:
            value = row.values.get(t)
            cells.append(_fmt(value, row.fmt))
            if "reference" in targets:
                cells.append(_ratio(value, ref, row.ratio))
            if row.goals and t in row.goals:
                text, check = row.goals[t]
                goal_texts.append(f"{t}: {text}")
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    verdicts.append(f"{t}: not run")
                elif check(value, ref) is None:
                    verdicts.append(f"{t}: needs the reference target in the same run")
                else:
                    verdict = f"{t}: {'yes' if check(value, ref) else '**NO**'}"
                    busy = (row.noise or {}).get(t)
                    if busy is not None and busy > BUSY:
                        verdict += f" (busy machine: {busy:.0f} % of a core used by others)"
                    verdicts.append(verdict)
        cells += ["; ".join(goal_texts), "; ".join(verdicts)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missed_targets(rows: list[Row]) -> list[str]:
    missed = []
    for row in rows:
        for t, (text, check) in (row.goals or {}).items():
            value = row.values.get(t)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if check(value, row.values.get("reference")) is False:
                busy = (row.noise or {}).get(t)
                note = (
                    f"; measured while others used {busy:.0f} % of a core" if busy is not None and busy > BUSY else ""
                )
                missed.append(f"{t}: {row.label} = {_fmt(value, row.fmt)} (target {text}{note})")
    return missed
