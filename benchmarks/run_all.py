"""Run every benchmark, save its JSON in benchmarks/results/, and write SUMMARY.md.

Each ``bench_*.py`` prints one JSON document on stdout. The summary is one table: a row per case,
what is compared, the ratio, its target and whether it is met, with the machine and the
run-to-run spread.

Usage: python benchmarks/run_all.py [--device cpu] [bench names ... | --summary-only]

``--device`` is passed to every benchmark (each synchronises the device around its timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
BENCHES = ["bench_sync", "bench_divergence", "bench_downstream", "bench_credit", "bench_step_overhead"]


Row = tuple[str, str, str, str, str]  # case, what is compared, ratio, target, met


def _met(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def _spread(values: list[float]) -> str:
    return f" (runs {min(values):g}–{max(values):g})" if len(values) > 1 else ""


def _rows_sync(data: dict[str, Any]) -> list[Row]:
    return [
        (
            f"collection compute, {r['world_size']} ranks, {r['metrics']} metrics / {r['states']} states",
            f"one fused all_reduce ({r['ours_collection_compute']['median_ms']} ms) vs torchmetrics' "
            f"per-state sync ({r['torchmetrics_per_state_sync']['median_ms']} ms)",
            f"{r['ratio']}× faster",
            "—",
            "—",
        )
        for r in data["results"]
    ] + [
        (
            f"quantile sketch in the sync, {r['world_size']} ranks",
            f"collection compute with the sketch ({r['sketch']['on']['state_elements']} state elements, "
            f"{r['sketch']['on']['median_ms']} ms) vs without ({r['sketch']['off']['state_elements']}, "
            f"{r['sketch']['off']['median_ms']} ms)",
            f"{r['sketch']['time_ratio_on_vs_off']}× the time",
            "—",
            "—",
        )
        for r in data["results"]
        if "sketch" in r
    ]


def _rows_divergence(data: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for r in data["timing"]:
        case = f"next-token divergences, B={r['batch']} T={r['sequence']} V={r['vocab']}"
        case += f", top-{r['num_logits']}" if r["num_logits"] else ", full vocabulary"
        rows.append(
            (
                case,
                f"chunked update ({r['update_ms']} ms) vs naive ({r['naive_ms']} ms)",
                f"{r['speedup_vs_naive']}× faster",
                "≥ 10×",
                _met(r["meets_speedup_target_10x"]),
            )
        )
        rows.append(
            (
                case,
                f"update vs one log_softmax pass ({r['floor_ms']} ms)",
                f"{r['ratio_to_floor']}× the floor{_spread(r.get('ratio_to_floor_all', []))}",
                "≤ 4×",
                _met(r["meets_floor_target_4x"]),
            )
        )
        if "ratio_to_floor_sketch" in r:
            rows.append(
                (
                    case,
                    "update with the quantile sketch vs one log_softmax pass",
                    f"{r['ratio_to_floor_sketch']}× the floor{_spread(r.get('ratio_to_floor_sketch_all', []))}",
                    "≤ 4×",
                    _met(r["ratio_to_floor_sketch"] <= 4),
                )
            )
    rows.append(
        (
            "divergence memory, all shapes",
            "extra peak memory of an update",
            f"{data['memory_max_extra_peak_mib']} MiB",
            "≤ 64 MiB",
            _met(data["meets_memory_target_64mib"]),
        )
    )
    return rows


def _rows_downstream(data: dict[str, Any]) -> list[Row]:
    rows: list[Row] = [
        (
            f"downstream reconstruction, B={r['batch']} T={r['sequence']} V={r['vocab']}",
            f"chunked update ({r['update_ms']} ms) vs SAELens-style full log_softmax ({r['reference_ms']} ms)",
            f"{r['speedup']}× faster{_spread(r.get('per_rep_speedup', []))}",
            "≥ 5×",
            _met(r["speedup"] >= 5),
        )
        for r in data["timing"]
    ]
    rows.append(
        (
            "downstream memory, all shapes",
            "extra peak memory of an update",
            f"{data['memory_max_extra_peak_mib']} MiB",
            "≤ 64 MiB",
            _met(data["meets_memory_target_64mib"]),
        )
    )
    return rows


def _rows_credit(data: dict[str, Any]) -> list[Row]:
    case = f"perturbation correlation, width {data['width']}, {data['threads']} thread(s)"
    targets, met = data["targets"], data["meets_targets"]
    rows: list[Row] = [
        (
            case,
            f"batched directions ({data['batched_ms']} ms) vs a loop of loss_fn calls ({data['loop_ms']} ms)",
            f"{data['ratio']}× faster (median {data['ratio_median']})",
            "—",
            "—",
        ),
        (
            case,
            "batched path vs its ceiling (drawing the normals + one stacked loss evaluation)",
            f"{data['batched_vs_ceiling']}× the ceiling",
            f"≤ {targets['batched_vs_ceiling']}×",
            _met(met["batched_vs_ceiling"]),
        ),
        (
            case,
            f"keyed directions ({data['keyed_ms']} ms, sharding-invariant) vs one stream ({data['batched_ms']} ms)",
            f"{data['keyed_ratio']}× the time",
            f"≤ {targets['keyed_ratio']}×",
            _met(met["keyed_ratio"]),
        ),
    ]
    rows += [
        (
            f"perturbation correlation, {r['name'].replace('_', ', ')}",
            "batched vs loop",
            f"{r['ratio']}× faster",
            "—",
            "—",
        )
        for r in data.get("sweep", [])
    ]
    return rows


def _rows_step(data: dict[str, Any]) -> list[Row]:
    shape = ", ".join(f"{k}={v}" for k, v in data["shape"].items())
    return [
        (
            f"update of {data['metrics']} metrics ({shape})",
            f"our updates ({data['ours_update_median_ms']} ms) vs the same math in bare torch "
            f"({data['bare_torch_median_ms']} ms)",
            f"{data['ratio_ours_vs_bare']}× the time (unchecked: {data['ratio_unchecked_vs_bare']}×)",
            "—",
            "—",
        )
    ]


ROWS = {
    "bench_sync": _rows_sync,
    "bench_divergence": _rows_divergence,
    "bench_downstream": _rows_downstream,
    "bench_credit": _rows_credit,
    "bench_step_overhead": _rows_step,
}


def _machine(results: dict[str, dict[str, Any]]) -> str:
    env = results.get("bench_divergence", {}).get("environment", {})
    if not env:
        return f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (not recorded by the benchmarks)."
    load = ", ".join(f"{x:.1f}" for x in env.get("load_average", []))
    return (
        f"Machine: {env.get('machine')}, {env.get('cpu_count')} CPUs, {env.get('threads')} torch threads, "
        f"torch {env.get('torch')}; load average at the divergence run {load} (the machine is shared)."
    )


def _spread_line(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    timing = results.get("bench_divergence", {}).get("timing", [])
    runs = [r["ratio_to_floor_all"] for r in timing if r.get("ratio_to_floor_all")]
    if runs:
        spread = max(max(x) - min(x) for x in runs)
        parts.append(
            f"the divergence floor ratio moves by up to {spread:.2f} between its {len(runs[0])} repeats"
        )
    credit = results.get("bench_credit")
    if credit:
        parts.append(
            f"the credit ratio's mean and median differ by {abs(credit['ratio'] - credit['ratio_median']):.2f}"
        )
    if not parts:
        return ""
    return "Run-to-run spread: " + "; ".join(parts) + ". Treat differences of that size as noise."


def summary(elapsed: dict[str, float], failed: dict[str, int]) -> str:
    """SUMMARY.md from the saved JSON of every benchmark (those not run now keep their last result)."""
    results = {
        name: json.loads((RESULTS / f"{name}.json").read_text())
        for name in BENCHES
        if (RESULTS / f"{name}.json").exists() and name not in failed
    }
    lines = [
        "# Benchmark summary",
        "",
        "Generated by `nox -s bench` (`python benchmarks/run_all.py`; `--summary-only` rewrites this file",
        "from the saved JSON). Each ratio compares two implementations timed in the same run on the same",
        "machine; absolute times are in the JSON files next to this one.",
        "",
        _machine(results),
        _spread_line(results),
        "",
        "| case | what is compared | ratio | target | met |",
        "|---|---|---|---|---|",
    ]
    for name, data in results.items():
        lines += [f"| {' | '.join(row)} |" for row in ROWS[name](data)]
    lines.append("")
    for name in BENCHES:
        when = f"run now, {elapsed[name]:.0f} s" if name in elapsed else "saved result, not re-run"
        status = f"failed (exit {failed[name]}), see the run's stderr" if name in failed else when
        lines.append(f"- `{name}`: {status}")
    return "\n".join(lines) + "\n"


def main() -> None:
    from _device import add_device_argument  # a sibling script's module, importable when run as a script

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {BENCHES})")
    parser.add_argument("--summary-only", action="store_true", help="rewrite SUMMARY.md from the saved JSON")
    add_device_argument(parser)
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {BENCHES}")
    names = [] if args.summary_only else args.names or BENCHES
    RESULTS.mkdir(exist_ok=True)
    elapsed: dict[str, float] = {}
    failed: dict[str, int] = {}
    for name in names:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(HERE / f"{name}.py"), "--device", str(args.device)],
            capture_output=True,
            text=True,
            check=False,
        )
        elapsed[name] = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            failed[name] = proc.returncode
            continue
        data = json.loads(proc.stdout)
        (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
        print(f"{name}: done in {elapsed[name]:.0f} s", file=sys.stderr)

    (RESULTS / "SUMMARY.md").write_text(summary(elapsed, failed))
    print((RESULTS / "SUMMARY.md").read_text())


if __name__ == "__main__":
    main()
