"""The scale-out target in one invocation: one relay instance on PostgreSQL + Redis against the SQLite process.

    .venv/bin/python -m bench.scaleout --database-url postgresql://postgres@127.0.0.1:5432/test \
        --redis-url redis://127.0.0.1:6379/7 [--transports ws] [--quick] [--output bench/results/scaleout]

Each step runs on both deployments back to back (SQLite first, then PostgreSQL + Redis), so a change in the
machine's load between steps moves both: the ratios hold where absolute figures move. Two measures:

- capacity: the most streams at 20 deltas/s, all started within 1 s, that meet the capacity criterion of
  bench.run (0 errors, exact text, p99 < 50 ms, first chunk p99 < 300 ms); target: PostgreSQL + Redis holds
  at least 80% of SQLite's;
- CPU per stream start: the relay's CPU for a burst of N streams of one delta each (a start, one chunk, the
  save) subtracted from that for 2N, divided by N: the marginal cost of a start, without what an instance
  spends anyway; the median of three such pairs per deployment, taken in turns; target: PostgreSQL + Redis
  within 1.5x SQLite's.

The relay runs pinned to core 0 as in bench.run; the upstream and the load generator share core 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report
from .run import RESULTS, Case, Deployment, machine, run_case

CAPACITY_RATIO_TARGET = 0.8
START_CPU_RATIO_TARGET = 1.5
START_REPEATS = 3


def capacity_steps(quick: bool) -> list[int]:
    return [50, 100] if quick else [250, 500, 750, 1000]


def measure(transports: list[str], deployments: dict[str, Deployment], quick: bool, workdir: Path,
            profile: Path | None = None) -> dict[str, Any]:
    """Every case on every deployment, interleaved; a deployment stops climbing a ramp after its first miss."""
    runs: list[dict[str, Any]] = []
    index = 0

    def run(case: Case, name: str) -> dict[str, Any]:
        nonlocal index
        index += 1
        label = f"{index:03d}-{name}-{case.workload}-{case.streams}-{case.transport}"
        result = run_case(case, workdir / label, deployments[name], profile)
        result["deployment_name"] = name
        runs.append(result)
        print(f"{name:<16} {report.one_line(result)}", flush=True)
        return result

    capacity: dict[str, dict[str, int]] = {transport: {} for transport in transports}
    start_cpu: dict[str, dict[str, float | None]] = {transport: {} for transport in transports}
    start_cpu_all: dict[str, dict[str, list[float]]] = {transport: {} for transport in transports}
    for transport in transports:
        climbing = set(deployments)
        for streams in capacity_steps(quick):
            for name in deployments:
                if name not in climbing:
                    continue
                result = run(Case("capacity", "relay", transport, streams=streams, deltas=20 if quick else 60,
                                  delay_ms=50, ramp_s=1), name)
                if report.meets_capacity(result):
                    capacity[transport][name] = streams
                else:
                    climbing.discard(name)
        # The marginal CPU between a burst and one twice its size: a start's own cost, without what an instance
        # spends anyway over the case (timers, leases, the warm-up). Each deployment measures it START_REPEATS
        # times, the deployments in turns, and keeps the median: one pair moves by a third between runs here.
        small = 50 if quick else 250
        marginals: dict[str, list[float]] = {name: [] for name in deployments}
        for _ in range(1 if quick else START_REPEATS):
            for name in deployments:
                cpu: list[float] = []
                for streams in (small, 2 * small):
                    result = run(Case("starts", "relay", transport, streams=streams, deltas=1, delay_ms=0,
                                      ramp_s=2), name)
                    spent = result.get("target_cpu_s")
                    if "failed" not in result and result.get("errors") == 0 and isinstance(spent, (int, float)):
                        cpu.append(float(spent))
                if len(cpu) == 2:
                    marginals[name].append((cpu[1] - cpu[0]) / small * 1e3)
        for name, values in marginals.items():
            start_cpu[transport][name] = statistics.median(values) if values else None
            start_cpu_all[transport][name] = [round(value, 3) for value in values]
    return {"runs": runs, "capacity": capacity, "start_cpu_ms": start_cpu, "start_cpu_ms_each": start_cpu_all}


def _each(measured: dict[str, Any], transport: str, name: str) -> str:
    """The pairs a CPU-per-start median was taken of, as " (a, b, c)", or nothing for a single pair."""
    values = measured.get("start_cpu_ms_each", {}).get(transport, {}).get(name, [])
    return f" ({', '.join(f'{value:.2f}' for value in values)})" if len(values) > 1 else ""


def verdicts(measured: dict[str, Any]) -> list[str]:
    lines = ["| transport | capacity SQLite | capacity PostgreSQL + Redis | ratio (target >= 0.8) "
             "| CPU per start SQLite (median of) | CPU per start PostgreSQL + Redis (median of) "
             "| ratio (target <= 1.5) |",
             "|---|---|---|---|---|---|---|"]
    for transport, capacity in measured["capacity"].items():
        lite, scaled = capacity.get("sqlite", 0), capacity.get("postgresql+redis", 0)
        cpu = measured["start_cpu_ms"][transport]
        lite_cpu, scaled_cpu = cpu.get("sqlite"), cpu.get("postgresql+redis")
        ratio = scaled / lite if lite else None
        cpu_ratio = scaled_cpu / lite_cpu if lite_cpu and scaled_cpu else None
        capacity_verdict = "met" if ratio is not None and ratio >= CAPACITY_RATIO_TARGET else "missed"
        cpu_verdict = "met" if cpu_ratio is not None and cpu_ratio <= START_CPU_RATIO_TARGET else "missed"
        lines.append(
            f"| {transport} | {lite or 'none'} | {scaled or 'none'} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'}: {capacity_verdict} | "
            f"{'n/a' if lite_cpu is None else f'{lite_cpu:.2f} ms'}{_each(measured, transport, 'sqlite')} | "
            f"{'n/a' if scaled_cpu is None else f'{scaled_cpu:.2f} ms'}"
            f"{_each(measured, transport, 'postgresql+redis')} | "
            f"{'n/a' if cpu_ratio is None else f'{cpu_ratio:.2f}'}: {cpu_verdict} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="a PostgreSQL server: a new database per case")
    parser.add_argument("--redis-url", required=True, help="Redis, e.g. redis://127.0.0.1:6379/7")
    parser.add_argument("--transports", default="ws", help="sse, ws or both (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="tiny steps, for a smoke run")
    parser.add_argument("--profile", metavar="DIR", help="record each case under py-spy into DIR (collapsed stacks)")
    parser.add_argument("--output", default=str(RESULTS / "scaleout"), help="results folder")
    args = parser.parse_args(argv)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not transports or any(t not in ("sse", "ws") for t in transports):
        parser.error("--transports takes sse, ws or both")
    deployments = {"sqlite": Deployment(), "postgresql+redis": Deployment(1, args.database_url, args.redis_url)}
    began = time.monotonic()
    facts = machine()
    with tempfile.TemporaryDirectory(prefix="deltarelay-scaleout-") as tmp:
        profile = Path(args.profile).resolve() if args.profile else None
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
        measured = measure(transports, deployments, args.quick, Path(tmp), profile)
    table = verdicts(measured)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    document = {"machine": facts, "quick": args.quick, "duration_s": round(time.monotonic() - began, 1), **measured}
    (output / "latest.json").write_text(json.dumps(document, indent=1, default=str))
    text = "\n".join([f"# Scale-out: one instance on PostgreSQL + Redis against SQLite ({facts['date'][:16]} UTC)",
                      "", "`python -m bench.scaleout` " + " ".join(argv if argv is not None else sys.argv[1:]), "",
                      *table, ""])
    (output / "latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
