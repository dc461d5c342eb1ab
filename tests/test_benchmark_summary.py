"""benchmarks/run_all.py: SUMMARY.md is a table of cases a reader understands, from the saved JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_run_all():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_summary_has_one_row_per_case_with_ratio_target_and_met() -> None:
    run_all = load_run_all()
    text = run_all.summary({}, {})
    assert "| case | what is compared | ratio | target | met |" in text
    assert text.count("\nMachine: ") == 1 and "Run-to-run spread: " in text
    sync = json.loads((ROOT / "benchmarks" / "results" / "bench_sync.json").read_text())
    for r in sync["results"]:
        assert (
            f"| collection compute, {r['world_size']} ranks," in text and f"| {r['ratio']}× faster |" in text
        )
    credit = json.loads((ROOT / "benchmarks" / "results" / "bench_credit.json").read_text())
    for key in ("batched_vs_ceiling", "keyed_ratio"):
        met = "yes" if credit["meets_targets"][key] else "**no**"
        assert f"| {credit[key]}× the ceiling |" in text or f"| {credit[key]}× the time |" in text
        assert f"| ≤ {credit['targets'][key]}× | {met} |" in text
    downstream = json.loads((ROOT / "benchmarks" / "results" / "bench_downstream.json").read_text())
    for r in downstream["timing"]:
        assert f"| downstream reconstruction, B={r['batch']} T={r['sequence']} V={r['vocab']} |" in text
    assert "ratio_to_floor" not in text and "timing[" not in text  # no raw JSON paths
    body = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(line.count(" | ") == 4 for line in body)  # five columns on every row
