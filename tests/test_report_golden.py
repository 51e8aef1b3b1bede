"""`klbench report` keeps its outputs: the table (md, csv) and the manifest's per-variant numbers of a
fixture sweep equal those the report produced before it moved onto pandas (tests/data/report_golden)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_fixture import make_golden_sweep

from klbench import report

GOLDEN = Path(__file__).parent / "data" / "report_golden"


@pytest.mark.parametrize(("case", "flags"), [("default", []), ("include_failed_window_0.5", ["--include-failed", "--window", "0.5"])])
def test_report_outputs_equal_the_golden_ones(tmp_path, case, flags):
    sweep = make_golden_sweep(tmp_path)
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out), *flags]) == 0
    for name in ("table.md", "table.csv"):
        assert (out / name).read_bytes() == (GOLDEN / case / name).read_bytes(), name
    manifest = json.loads((out / "manifest.json").read_text())
    golden = json.loads((GOLDEN / case / "manifest_part.json").read_text())
    for key, value in golden.items():
        assert manifest[key] == value, key
