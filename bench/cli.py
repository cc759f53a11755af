"""``python -m bench``: run the scenarios against the targets and print the table.

Everything runs on 127.0.0.1, starts its own servers (and Redis) as
subprocesses on free ports, is bounded in time and stops them all at the end,
also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .procs import Processes, raise_nofile_limit
from .profile import Profiler, summarise
from .report import build_rows, markdown_table, missed_targets
from .runner import SCENARIOS, TARGETS, Options, run_memory, run_traffic

__all__ = ["main", "parse_args"]


def _csv(kind):
    def parse(text: str):
        return tuple(kind(part) for part in text.split(",") if part.strip())

    return parse


def _choices(allowed):
    def parse(text: str):
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(allowed)}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the relay against a bare reference relay (ratios measured in one run).",
    )
    parser.add_argument(
        "--targets",
        type=_choices(TARGETS),
        default=defaults.targets,
        help=f"comma-separated, from {','.join(TARGETS)} (default: all)",
    )
    parser.add_argument(
        "--scenarios",
        type=_choices(SCENARIOS),
        default=defaults.scenarios,
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run: 1 round, 2 s windows, 3 fan-out repeats, memory at 1000 and 5000",
    )
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds measured per loop scenario")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="seconds of traffic before measuring")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="clients in the loop scenarios")
    parser.add_argument("--outstanding", type=int, default=defaults.outstanding, help="commands in flight, closed loop")
    parser.add_argument("--controllers", type=int, default=defaults.controllers, help="controller connections")
    parser.add_argument("--rates", type=_csv(float), default=defaults.rates, help="open-loop rates, commands/s")
    parser.add_argument("--fanout-clients", type=int, default=defaults.fanout_clients)
    parser.add_argument("--fanout-repeats", type=int, default=defaults.fanout_repeats)
    parser.add_argument(
        "--memory-clients",
        type=_csv(int),
        default=defaults.memory_clients,
        help="idle client counts for the memory scenario",
    )
    parser.add_argument(
        "--memory-targets",
        type=_choices(TARGETS),
        default=defaults.memory_targets,
        help="targets the memory scenario runs on (default: reference,embedded)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="runs of each traffic scenario per target, interleaved across targets; medians reported",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=defaults.quiet_wait,
        help="seconds the whole run may spend waiting for other processes to go quiet before a scenario",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=defaults.quiet_threshold,
        help="quiet means other processes use less than this %% of a core",
    )
    parser.add_argument(
        "--extra-target",
        action="append",
        default=[],
        metavar="NAME=WSBRIDGE",
        help="also run another wsbridge script on the embedded broker as target NAME "
        "(e.g. a branch's .venv/bin/wsbridge, to compare it in the same run); repeatable",
    )
    parser.add_argument("--wsbridge", type=Path, default=None, help="the wsbridge script (default: next to python)")
    parser.add_argument("--json", type=Path, default=None, help="also write every raw figure to this JSON file")
    parser.add_argument(
        "--py-spy", type=Path, default=None, help="path to a py-spy binary: sample the appliance during the closed loop"
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path("bench/results/profiles"),
        help="where the py-spy collapsed stacks go (default bench/results/profiles)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (path printed)")
    args = parser.parse_args(argv)
    extra = {}
    for spec in args.extra_target:
        name, sep, path = spec.partition("=")
        if not sep or not name or name in TARGETS:
            parser.error(f"--extra-target wants NAME=PATH with a new NAME, got {spec!r}")
        extra[name] = Path(path)
    opts = replace(
        defaults,
        targets=(*args.targets, *extra),
        extra_targets=extra,
        scenarios=args.scenarios,
        duration=args.duration,
        warmup=args.warmup,
        clients=args.clients,
        outstanding=args.outstanding,
        controllers=args.controllers,
        rates=args.rates,
        fanout_clients=args.fanout_clients,
        fanout_repeats=args.fanout_repeats,
        memory_clients=args.memory_clients,
        memory_targets=(*args.memory_targets, *extra),
        rounds=max(1, args.rounds),
        quiet_wait=args.quiet_wait,
        quiet_threshold=args.quiet_threshold,
    )
    if args.py_spy is not None:
        opts = replace(opts, profiler=Profiler(args.py_spy, args.profile_dir))
    if args.quick:
        opts = replace(
            opts,
            duration=min(opts.duration, 2.0),
            warmup=min(opts.warmup, 0.5),
            rounds=1,
            fanout_repeats=min(opts.fanout_repeats, 3),
            memory_clients=tuple(c for c in opts.memory_clients if c <= 5000) or (1000,),
        )
    return opts, args


async def _run(opts: Options, args: argparse.Namespace, workdir: Path) -> dict:
    results: dict = {target: {} for target in opts.targets}
    with Processes(workdir, args.wsbridge) as procs:
        if {"closed", "open", "fanout", "redis-conns"} & set(opts.scenarios):
            print(f"== traffic scenarios, targets interleaved: {', '.join(opts.targets)}", flush=True)
            started = time.monotonic()
            for target, figures in (await run_traffic(opts, procs)).items():
                results[target].update(figures)
            print(f"   done in {time.monotonic() - started:.0f} s", flush=True)
        if "memory" in opts.scenarios:
            for target in opts.targets:
                if target not in opts.memory_targets:
                    continue
                print(f"== memory per idle connection: {target}", flush=True)
                started = time.monotonic()
                try:
                    results[target]["memory"] = await run_memory(target, opts, procs)
                except Exception as exc:  # one broken target must not hide the others' figures
                    print(f"  [{target}] FAILED: {exc}", flush=True)
                    results[target]["failed"] = f"memory: {exc}"
                print(f"   done in {time.monotonic() - started:.0f} s", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    opts, args = parse_args(argv)
    limit = raise_nofile_limit()
    needed = max(opts.memory_clients or (0,)) + max(opts.fanout_clients, opts.clients) + 100
    if limit < needed:
        print(f"warning: open-files limit {limit} < {needed}; raise the hard limit (ulimit -Hn)", file=sys.stderr)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    tmp = tempfile.TemporaryDirectory(prefix="wsbridge-bench-")
    workdir = Path(tmp.name)
    started = time.monotonic()
    try:
        coro = _run(opts, args, workdir)
        results = uvloop.run(coro) if uvloop else asyncio.run(coro)
    finally:
        if args.keep_logs:
            print(f"server logs kept in {workdir}")
        else:
            tmp.cleanup()
    rows = build_rows(
        results,
        opts.rates,
        opts.memory_clients if "memory" in opts.scenarios else (),
        embedded_like=tuple(opts.extra_targets),
    )
    print()
    print(markdown_table(rows, list(opts.targets)))
    print()
    missed = missed_targets(rows)
    failed = [t for t, r in results.items() if "failed" in r]
    for target in failed:
        print(f"target {target} FAILED: {results[target]['failed']}")
    print("targets missed:" if missed else "targets missed: none")
    for line in missed:
        print(f"  - {line}")
    if opts.profiler is not None:
        for collapsed in sorted([*args.profile_dir.glob("*-closed.txt"), *args.profile_dir.glob("*-fanout.txt")]):
            print()
            print(summarise(collapsed))
    print(f"(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"options": _jsonable(opts), "results": results}, indent=2, default=str))
    if failed:
        sys.exit(1)


def _jsonable(opts: Options) -> dict:
    return {k: v for k, v in vars(opts).items() if k not in ("log", "profiler")}
