"""The particle-noise benchmark in a tiny setting: rows against the exact garch200 moments."""

import json
import math

import pytest

from benchmarks.particle_noise import main


@pytest.mark.slow
def test_rows_table_and_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--seeds", "0", "--particles", "0", "2", "--num-steps", "5", "--num-draws", "300"]
    rows = main([*argv, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert [row["particles"] for row in rows] == ["fit's rule", 2]
    for row in rows:
        assert row["steps"] == 5 and sorted(row["errors"]) == ["alpha", "beta_frac", "mu", "omega"]
        # five steps from the Laplace start: near the posterior, not on it
        assert all(math.isfinite(v) for e in row["errors"].values() for v in e.values())
        assert row["worst_mean"] < 2.0 and row["worst_log_sd"] < 1.0
    assert rows[1]["particle_schedule"] == [[0, 2]] or rows[1]["particle_schedule"] == [(0, 2)]
    table = capsys.readouterr().out
    assert table.count("| garch200 | 0 |") == 2 and "within 0.1 sd and 10%" in table
