"""The benchmarks run end to end on a tiny setting and write well-formed output (no timing assertions)."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_step_time_writes_table_json_and_plot(tmp_path, capsys):
    from benchmarks import step_time

    out = tmp_path / "st.json"
    png = tmp_path / "st.png"
    step_time.main(["--steps", "2", "--seqs", "2", "--seq-len", "12", "--json", str(out), "--plot", str(png)])
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert set(summary["phases"]) == set(step_time.VARIANTS)
    assert summary["phases"]["recompute"]["recompute_logp"]["median"] > 0
    for name in ("areal-loglinear", "a3po-paper", "a3po-recompute"):
        assert summary["phases"][name]["recompute_logp"]["median"] == 0  # no recompute forward
    assert summary["ratio_vs_recompute"]["recompute"]["median"] == pytest.approx(1.0)
    assert 0 < summary["limit_ratio"]["median"] < 1
    assert summary["interpolation"]["seconds"] > 0
    assert all(len(rows) == 2 for rows in data["per_step"].values())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "limit ratio" in capsys.readouterr().out
