"""From the runs of bench.run to the summary, the Markdown table and the PNG plots. No I/O but the plot files.

Targets are issue 5's; a target that misses says "miss", and nothing here holds a measured figure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Issue 5's criteria.
CAPACITY_P99_MS = 50.0
CAPACITY_FIRST_CHUNK_P99_MS = 300.0
CAPACITY_MIN_STREAMS = 450
CAPACITY_GOAL_STREAMS = 1000
CAPACITY_VS_SEED = 3.0
LATENCY_OVER_DIRECT_MS = 2.0
THROUGHPUT_VS_SEED = 3.0
IDLE_WS_VS_BARE = 1.2
ACTIVE_VS_IDLE_BARE = 2.0
FLAT_GROWTH = 0.05  # RSS at the last checkpoint at most 5% above the first
LOAD_CORE_BUSY = 0.9  # above this the upstream + load generator core may be the bottleneck


def label(run: dict[str, Any]) -> str:
    case = run["case"]
    return f"{case['target']}/{case['transport']}"


def _get(run: dict[str, Any] | None, *path: str) -> Any:
    value: Any = run
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not math.isnan(value) else None


def load_core_busy(run: dict[str, Any]) -> float | None:
    return _num(_get(run, "core_busy", "cpu1"))


def meets_capacity(run: dict[str, Any]) -> bool:
    """Zero errors, exact text, p99 relay latency < 50 ms, first chunk p99 < 300 ms."""
    p99 = _num(_get(run, "latency_ms", "p99"))
    first = _num(_get(run, "first_chunk_ms", "p99"))
    return ("failed" not in run and run.get("errors") == 0 and run.get("exact_text") is True
            and p99 is not None and p99 < CAPACITY_P99_MS and first is not None and first < CAPACITY_FIRST_CHUNK_P99_MS)


def _runs(document: dict[str, Any], workload: str) -> list[dict[str, Any]]:
    return [run for run in document["runs"] if run["case"]["workload"] == workload]


def _find(document: dict[str, Any], workload: str, target: str, transport: str) -> dict[str, Any] | None:
    for run in _runs(document, workload):
        if run["case"]["target"] == target and run["case"]["transport"] == transport:
            return run
    return None


def kb_per_active_stream(run: dict[str, Any] | None) -> float | None:
    """(peak RSS during the run - RSS before it) / streams."""
    if run is None or "failed" in run:
        return None
    peak, before = _num(run.get("target_peak_rss_kb")), _num(run.get("target_rss_before_kb"))
    streams = run["case"]["streams"]
    if peak is None or before is None or not streams:
        return None
    return (peak - before) / float(streams)


def cpu_us_per_chunk(run: dict[str, Any] | None) -> float | None:
    cpu, deltas = _num(_get(run, "target_cpu_s")), _num(_get(run, "deltas"))
    return cpu / deltas * 1e6 if cpu is not None and deltas else None


def throughput_note(relay: dict[str, Any], seed: dict[str, Any] | None) -> str:
    """The relay's and the seed's CPU per chunk, and whether the load core, not the relay, set the figure.

    Both sides are about as fast here (the upstream and the load generator share one core), so a slow moment
    on the load core lowers the relay's chunks/s while the seed, at ~35 us a chunk, stays relay-bound: the CPU
    per chunk compares the two relays whatever the load core did.
    """
    parts = []
    relay_us, seed_us = cpu_us_per_chunk(relay), cpu_us_per_chunk(seed)
    if relay_us is not None and seed_us is not None:
        parts.append(f"CPU per chunk {relay_us:.1f} us, seed {seed_us:.1f} us ({seed_us / relay_us:.1f}x)")
    busy = load_core_busy(relay)
    if busy is not None and busy >= LOAD_CORE_BUSY:
        parts.append(f"load-bound: the load core was {busy:.0%} busy")
    return "; ".join(parts)


def summarize(document: dict[str, Any]) -> dict[str, Any]:
    """Capacity per target and transport, and issue 5's targets, each with its verdict."""
    capacity: dict[str, Any] = {}
    direct_meets = {run["case"]["streams"]: meets_capacity(run) for run in _runs(document, "capacity")
                    if run["case"]["target"] == "direct"}
    for run in sorted(_runs(document, "capacity"), key=lambda r: r["case"]["streams"]):
        entry = capacity.setdefault(label(run), {"capacity": 0, "points": [], "broken": False,
                                                 "first_miss": None, "load_bound": False})
        ok = meets_capacity(run)
        n = run["case"]["streams"]
        entry["points"].append({"streams": n, "meets": ok, "direct_meets": direct_meets.get(n),
                                "p99_ms": _get(run, "latency_ms", "p99"),
                                "first_chunk_p99_ms": _get(run, "first_chunk_ms", "p99"),
                                "errors": run.get("errors"), "exact_text": run.get("exact_text"),
                                "load_core_busy": load_core_busy(run)})
        # Capacity: the largest N that meets the criteria with every smaller N meeting them too.
        if ok and not entry["broken"]:
            entry["capacity"] = n
        elif not ok and not entry["broken"]:
            entry["broken"] = True
            entry["first_miss"] = n
            # When the direct read misses at the same N, the load side (core 1) is the limit, not the target.
            entry["load_bound"] = direct_meets.get(n) is False
    targets: list[dict[str, Any]] = []
    transports = sorted({run["case"]["transport"] for run in document["runs"] if run["case"]["target"] == "relay"})
    seed_cap = _get(capacity, "seed/sse", "capacity")
    for transport in transports:
        relay = f"relay/{transport}"
        note = "" if transport == "sse" else "the seed has no WebSocket: compared with its SSE figure"
        if relay in capacity and seed_cap is not None:
            value = capacity[relay]["capacity"]
            ratio = value / seed_cap if seed_cap else None
            ok = value >= CAPACITY_MIN_STREAMS and (ratio is None or ratio >= CAPACITY_VS_SEED) and seed_cap > 0
            if capacity[relay].get("load_bound"):
                note = "; ".join(filter(None, [note, f"load-bound at {capacity[relay]['first_miss']:,}: "
                                                     "the direct read misses there too"]))
            targets.append(_target("capacity (streams)", transport, value, seed_cap,
                                   _get(capacity, "direct/sse", "capacity"), ratio,
                                   f">= {CAPACITY_MIN_STREAMS} and >= {CAPACITY_VS_SEED:g}x seed", ok, note))
        long_run = _find(document, "capacity_long", "relay", transport)
        if long_run is not None:
            seed_long = _find(document, "capacity_long", "seed", "sse")
            targets.append(_target(f"capacity goal ({long_run['case']['streams']} x {long_run['case']['deltas']})",
                                   transport, "meets" if meets_capacity(long_run) else "fails",
                                   ("meets" if meets_capacity(seed_long) else "fails") if seed_long else None,
                                   None, None, "p99 < 50 ms, first chunk < 300 ms, 0 errors, exact",
                                   meets_capacity(long_run), note))
        latency = _find(document, "latency", "relay", transport)
        direct = _find(document, "latency", "direct", "sse")
        seed = _find(document, "latency", "seed", "sse")
        p99, floor = _num(_get(latency, "latency_ms", "p99")), _num(_get(direct, "latency_ms", "p99"))
        if latency is not None and p99 is not None and floor is not None:
            ok = meets_capacity(latency) and p99 - floor <= LATENCY_OVER_DIRECT_MS
            targets.append(_target("latency p99 (ms)", transport, p99, _num(_get(seed, "latency_ms", "p99")),
                                   floor, None, f"<= direct + {LATENCY_OVER_DIRECT_MS:g} ms, 0 errors, exact", ok,
                                   note))
        thr = _find(document, "throughput", "relay", transport)
        thr_seed = _find(document, "throughput", "seed", "sse")
        thr_direct = _find(document, "throughput", "direct", "sse")
        value, base = _num(_get(thr, "chunks_per_s")), _num(_get(thr_seed, "chunks_per_s"))
        if thr is not None and value is not None:
            ratio = value / base if base else None
            ok = (ratio is not None and ratio >= THROUGHPUT_VS_SEED and thr.get("errors") == 0
                  and thr.get("exact_text") is True)
            targets.append(_target("throughput (chunks/s)", transport, value, base,
                                   _num(_get(thr_direct, "chunks_per_s")), ratio,
                                   f">= {THROUGHPUT_VS_SEED:g}x seed, 0 errors, exact", ok,
                                   "; ".join(filter(None, [note, throughput_note(thr, thr_seed)]))))
    bare_idle = _num(_get(_find(document, "memory_idle", "bare", "ws"), "kb_per_socket"))
    relay_idle_run = _find(document, "memory_idle", "relay", "ws")
    relay_idle = _num(_get(relay_idle_run, "kb_per_socket"))
    if relay_idle is not None and bare_idle:
        trimmed = _num(_get(_find(document, "memory_idle", "bare-relay-protocol", "ws"), "kb_per_socket"))
        note = "ratio is to the bare endpoint under uvicorn's own WebSocket protocol"
        if trimmed is not None:
            note += f"; under the relay's trimmed protocol the bare endpoint holds {_fmt(trimmed)} KB"
        targets.append(_target("memory per idle WebSocket (KB)", "ws", relay_idle, None, bare_idle,
                               relay_idle / bare_idle, f"<= {IDLE_WS_VS_BARE:g}x bare Starlette WebSocket",
                               relay_idle <= IDLE_WS_VS_BARE * bare_idle, note))
    for transport in transports:
        long_run = _find(document, "capacity_long", "relay", transport)
        per = kb_per_active_stream(long_run)
        if per is not None and bare_idle and long_run is not None:
            seed_per = kb_per_active_stream(_find(document, "capacity_long", "seed", "sse"))
            targets.append(_target("memory per active stream (KB)", transport, per, seed_per, bare_idle,
                                   per / bare_idle, f"<= {ACTIVE_VS_IDLE_BARE:g}x bare idle WebSocket",
                                   per <= ACTIVE_VS_IDLE_BARE * bare_idle,
                                   f"peak RSS over {long_run['case']['streams']} streams (capacity_long); "
                                   "ratio is to the bare idle WebSocket"))
        flat = _find(document, "memory_flat", "relay", transport)
        points = _get(flat, "checkpoints") or []
        if len(points) >= 2:
            first, last = points[0], points[-1]
            growth = (last["rss_kb"] - first["rss_kb"]) / first["rss_kb"] if first["rss_kb"] else None
            ok = (growth is not None and growth <= FLAT_GROWTH and flat is not None and flat.get("errors") == 0)
            targets.append(_target("memory growth over finished streams", transport,
                                   f"{first['rss_kb'] / 1024:.1f} -> {last['rss_kb'] / 1024:.1f} MB "
                                   f"({first['finished']} -> {last['finished']})", None, None, growth,
                                   f"RSS growth <= {FLAT_GROWTH:.0%} from the first checkpoint", ok,
                                   "ratio is the growth"))
    busy = [{"run": run["case"]["workload"] + " " + label(run), "streams": run["case"]["streams"],
             "load_core_busy": load_core_busy(run)}
            for run in document["runs"] if (load_core_busy(run) or 0) >= LOAD_CORE_BUSY]
    return {"capacity": capacity, "targets": targets, "load_core_saturated": busy}


def _target(name: str, transport: str, value: Any, seed: Any, direct: Any, ratio: float | None, criterion: str,
            ok: bool, note: str = "") -> dict[str, Any]:
    return {"target": name, "transport": transport, "relay": value, "seed": seed, "direct": direct,
            "ratio": ratio, "criterion": criterion, "verdict": "pass" if ok else "miss", "note": note}


# --- text -----------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def one_line(run: dict[str, Any]) -> str:
    """Progress: one line per finished case."""
    case = run["case"]
    head = f"{case['workload']:<14} {label(run):<10}"
    if "failed" in run:
        return f"{head} FAILED: {run['failed'].splitlines()[0][:200]}"
    busy = f"load core {_fmt(load_core_busy(run), 2)}"
    if case["kind"] == "idle_ws":
        return f"{head} {run.get('sockets')} idle sockets: {_fmt(_num(run.get('kb_per_socket')))} KB each; {busy}"
    lat = run.get("latency_ms") or {}
    text = (f"{head} {case['streams']}x{case['deltas']}@{case['delay_ms']:g}ms: errors {run.get('errors')} "
            f"exact {run.get('exact_text')} p50 {_fmt(lat.get('p50'), 2)} p99 {_fmt(lat.get('p99'), 2)} "
            f"max {_fmt(lat.get('max'), 2)} ms, first chunk p99 {_fmt(_get(run, 'first_chunk_ms', 'p99'))} ms, "
            f"{_fmt(_num(run.get('chunks_per_s')), 0)} chunks/s, target CPU {_fmt(_num(run.get('target_cpu_s')), 2)} s"
            f"; {busy} ({case_wall(run)})")
    if case["kind"] == "flat":
        text += f"; RSS checkpoints (MB) {[round(p['rss_kb'] / 1024, 1) for p in run.get('checkpoints', [])]}"
    return text


def case_wall(run: dict[str, Any]) -> str:
    return f"{run.get('case_wall_s', 0):.0f} s"


def _error_text(run: dict[str, Any]) -> str:
    if "failed" in run:
        return "run failed"
    kinds = run.get("error_kinds") or {}
    if not kinds:
        return "0"
    return f"{run.get('errors')} (" + ", ".join(f"{k} {v}" for k, v in kinds.items()) + ")"


def _saved_text(run: dict[str, Any]) -> str:
    saved = run.get("saved")
    if saved is None:
        return "–"
    if isinstance(saved, str):
        return saved
    total = sum(saved.values())
    done = saved.get("complete", saved.get("saved", 0))
    return f"{done}/{run.get('saved_expected')}" + ("" if total == done else f" (+{total - done} other)")


def _capacity_text(entry: dict[str, Any]) -> str:
    text = f"**{entry['capacity']:,}**"
    if entry.get("load_bound"):
        text += f" (load-bound at {entry['first_miss']:,})"
    return text


def markdown(document: dict[str, Any]) -> str:
    machine = document["machine"]
    summary = document["summary"]
    out: list[str] = []
    kind = "QUICK smoke run (tiny workloads: not the issue's figures)" if document["quick"] else "full run"
    out.append(f"# deltarelay benchmark: {kind}\n")
    dirty = " (server/ with uncommitted changes)" if machine.get("server_uncommitted_changes") else ""
    out.append(f"{machine['date']}, commit {machine.get('commit') or '?'}{dirty}, {machine['cpu_model']}, "
               f"{machine['cores']} cores, Python {machine['python']}, load average at start "
               f"{', '.join(f'{x:.2f}' for x in machine['load_average_at_start'])}. Target pinned to core "
               f"{machine['pinning']['target']}; upstream and load generator to core {machine['pinning']['upstream']}."
               f" {document['duration_s']:.0f} s in all.\n")
    out.append("## Targets (issue 5)\n")
    out.append("| target | transport | relay | seed port | direct | ratio | criterion | verdict | note |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for t in summary["targets"]:
        ratio = t["ratio"]
        ratio_text = "–" if ratio is None else (f"{ratio:+.1%}" if "growth" in t["target"] else f"{ratio:.2f}x")
        verdict = "pass" if t["verdict"] == "pass" else "**miss**"
        out.append(f"| {t['target']} | {t['transport']} | {_fmt(t['relay'])} | {_fmt(t['seed'])} | "
                   f"{_fmt(t['direct'])} | {ratio_text} | {t['criterion']} | {verdict} | {t['note']} |")
    if not summary["targets"]:
        out.append("| (no target measured) | | | | | | | | |")
    out.append("")
    if summary["capacity"]:
        out.append("## Capacity ramp\n")
        out.append("Capacity = the largest N whose run and every smaller N's run have p99 relay latency < 50 ms, "
                   "first chunk p99 < 300 ms, zero errors and exact text.\n")
        labels = list(summary["capacity"])
        out.append("| streams | " + " | ".join(f"{name} p99 / first p99 (ms)" for name in labels) + " |")
        out.append("|---|" + "---|" * len(labels))
        sizes = sorted({p["streams"] for entry in summary["capacity"].values() for p in entry["points"]})
        for n in sizes:
            cells = []
            for name in labels:
                point = next((p for p in summary["capacity"][name]["points"] if p["streams"] == n), None)
                if point is None:
                    cells.append("–")
                    continue
                mark = "" if point["meets"] else " ✗"
                errors = f", {point['errors']} errors" if point["errors"] else ""
                cells.append(f"{_fmt(_num(point['p99_ms']))} / {_fmt(_num(point['first_chunk_p99_ms']), 0)}"
                             f"{errors}{mark}")
            out.append(f"| {n:,} | " + " | ".join(cells) + " |")
        out.append("| **capacity** | " + " | ".join(_capacity_text(summary["capacity"][n]) for n in labels) + " |\n")
        out.append("\"load-bound\": the direct read misses the criteria at that N too, so the upstream + load "
                   "generator core, not the target, sets the limit there; the target's capacity is at least the "
                   "figure.\n")
    out.append("## Runs\n")
    out.append("Latency is per chunk: receive time - the upstream's send stamp. `direct` reads the upstream "
               "itself (the floor); `seed` is bench/baselines/seed_relay.py (SSE only). CPU is the target's "
               "own (utime + stime) over the measured phase; load core is core 1's busy share (upstream, load "
               "generator and anything else on it), and (other) the part of it that was neither of ours "
               "(other processes, kernel work). Latency and first chunk in ms.\n")
    out.append("| workload | target | streams x deltas @ pace | errors | exact | saved | p50 | p90 | p99 | max | "
               "first chunk p99 | chunks/s | target CPU s (% core) | target peak RSS MB | load core busy (other) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in document["runs"]:
        case = run["case"]
        if case["kind"] == "idle_ws":
            continue
        lat = run.get("latency_ms") or {}
        cpu, wall = _num(run.get("target_cpu_s")), _num(run.get("measured_wall_s"))
        cpu_text = f"{cpu:.2f} ({cpu / wall:.0%})" if cpu is not None and wall else "–"
        peak = _num(run.get("target_peak_rss_kb"))
        busy = load_core_busy(run)
        busy_text = "–" if busy is None else (f"**{busy:.0%}**" if busy >= LOAD_CORE_BUSY else f"{busy:.0%}")
        other = _num(run.get("load_core_other"))
        if busy is not None and other is not None:
            busy_text += f" ({max(0.0, other):.0%})"
        out.append(
            f"| {case['workload']} | {label(run)} | {case['streams']:,} x {case['deltas']:,} @ {case['delay_ms']:g} ms"
            f" | {_error_text(run)} | {_fmt(run.get('exact_text'))} | {_saved_text(run)} | {_fmt(lat.get('p50'), 2)}"
            f" | {_fmt(lat.get('p90'), 2)} | {_fmt(lat.get('p99'), 2)} | {_fmt(lat.get('max'), 1)} | "
            f"{_fmt(_get(run, 'first_chunk_ms', 'p99'))} | {_fmt(_num(run.get('chunks_per_s')), 0)} | {cpu_text} | "
            f"{_fmt(peak / 1024 if peak else None)} | {busy_text} |")
    idle = _runs(document, "memory_idle")
    if idle:
        out.append("\n## Idle WebSockets\n")
        out.append("KB per socket is the slope of RSS against open sockets over 4 steps, after 50 sockets opened "
                   "first (one-off costs out); the last column is (last - first) / sockets.\n")
        out.append("| target | sockets | failures | RSS before MB | RSS after MB | KB per socket | first to last |")
        out.append("|---|---|---|---|---|---|---|")
        for run in idle:
            before, after = _num(run.get("rss_before_kb")), _num(run.get("rss_after_kb"))
            out.append(f"| {run['case']['target']} | {_fmt(run.get('sockets'))} | {_fmt(run.get('failures'))} | "
                       f"{_fmt(before / 1024 if before else None)} | {_fmt(after / 1024 if after else None)} | "
                       f"{_fmt(_num(run.get('kb_per_socket')))} | "
                       f"{_fmt(_num(run.get('kb_per_socket_first_to_last')))} |")
    flat = _runs(document, "memory_flat")
    if flat:
        out.append("\n## RSS over finished streams (memory_flat)\n")
        out.append("| transport | " + " | ".join(f"{p['finished']:,}" for p in flat[0].get("checkpoints", []))
                   + " | 1 s after |")
        out.append("|---|" + "---|" * (len(flat[0].get("checkpoints", [])) + 1))
        for run in flat:
            cells = [f"{p['rss_kb'] / 1024:.1f}" for p in run.get("checkpoints", [])]
            end = _num(run.get("rss_end_kb"))
            out.append(f"| {run['case']['transport']} (MB) | " + " | ".join(cells)
                       + f" | {_fmt(end / 1024 if end else None)} |")
    out.append("\n## Notes\n")
    saturated = summary["load_core_saturated"]
    if saturated:
        names = ", ".join(f"{s['run']} ({s['streams']:,}: {s['load_core_busy']:.0%})" for s in saturated)
        out.append(f"- The upstream + load generator core was {LOAD_CORE_BUSY:.0%}+ busy in: {names}. "
                   "Those figures may be bounded by the load side, not the target; compare with `direct` at the "
                   "same size.")
    else:
        out.append(f"- The upstream + load generator core stayed under {LOAD_CORE_BUSY:.0%} busy in every run.")
    out.append("- The WebSocket rows compare with the seed port's SSE figures: the seed has no WebSocket.")
    out.append("- Each case starts fresh processes and a fresh SQLite file; 5 warm-up streams (3 deltas each) "
               "run before the measured phase.")
    failed = [run for run in document["runs"] if "failed" in run]
    for run in failed:
        out.append(f"- {run['case']['workload']} {label(run)} {run['case']['streams']}: run failed: "
                   f"{run['failed'].splitlines()[0][:300]}")
    out.append("\n![latency CDF](latency_cdf.png)\n\n![p99 against streams](p99_vs_streams.png)\n")
    return "\n".join(out)


# --- plots ----------------------------------------------------------------------------------------


def plots(document: dict[str, Any], folder: Path) -> list[str]:
    """latency_cdf.png and p99_vs_streams.png; none without matplotlib (pip install matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    title = " (QUICK smoke run)" if document["quick"] else ""
    runs = [run for run in _runs(document, "latency") if run.get("latency_cdf_ms")]
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in runs:
            points = [(ms, p) for p, ms in run["latency_cdf_ms"] if ms is not None and ms > 0]
            ax.plot([ms for ms, _ in points], [p for _, p in points], label=label(run), marker=".", markersize=3)
        case = runs[0]["case"]
        ax.set_xscale("log")
        ax.set_xlabel("relay latency per chunk (ms, log)")
        ax.set_ylabel("fraction of chunks")
        ax.set_title(f"Latency CDF: {case['streams']} streams x {case['deltas']} deltas @ {case['delay_ms']:g} ms"
                     + title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "latency_cdf.png", dpi=110)
        plt.close(fig)
        written.append("latency_cdf.png")
    capacity = document["summary"]["capacity"]
    if capacity:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, entry in capacity.items():
            ramp = [(p["streams"], p["p99_ms"], p["meets"]) for p in entry["points"] if _num(p["p99_ms"])]
            if not ramp:
                continue
            line, = ax.plot([n for n, _, _ in ramp], [ms for _, ms, _ in ramp], marker="o",
                            label=f"{name} (capacity {entry['capacity']:,}"
                                  + (f", load-bound at {entry['first_miss']:,})" if entry.get("load_bound") else ")"))
            misses = [(n, ms) for n, ms, ok in ramp if not ok]
            if misses:
                ax.scatter([n for n, _ in misses], [ms for _, ms in misses], marker="x", s=80,
                           color=line.get_color(), zorder=3)
        ax.axhline(CAPACITY_P99_MS, color="grey", linestyle="--", linewidth=1, label="50 ms target")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams (20 deltas/s each)")
        ax.set_ylabel("p99 relay latency (ms, log)")
        ax.set_title("p99 latency against concurrent streams (x: misses a criterion)" + title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "p99_vs_streams.png", dpi=110)
        plt.close(fig)
        written.append("p99_vs_streams.png")
    return written
