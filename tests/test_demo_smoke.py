"""Smoke test of ``fxprune demo --quick``: it runs end to end and writes its report and plots."""
import json

import pytest

from fxprune.app import demo


@pytest.mark.slow
def test_demo_quick_writes_report_and_plots(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "hyperflux", "hyperflux+exprune"]
    for row in rows.values():
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert 0 < row["effective_macs"] <= row["dense_macs"] * (1 + 1e-6)
        assert 0 < row["params_nonzero"] <= row["params"]
        assert row["latency_b1_ms"] > 0 and row["latency_b64_ms"] > 0
        assert 0.0 <= row["deployed_accuracy"] <= 1.0
    # the weight-pruned model deploys to the same outputs as its export: the same accuracy
    assert rows["hyperflux"]["deployed_accuracy"] == pytest.approx(rows["hyperflux"]["test_accuracy"], abs=1e-6)
    assert "sites/layers" in rows["hyperflux+exprune"]["deployed_paths"]
    assert all(c["reason"] for c in report["deploy"]["hyperflux+exprune"])  # every site says why its path
    assert rows["dense"]["dense_macs"] == pytest.approx(rows["hyperflux"]["dense_macs"])
    assert rows["hyperflux"]["params_nonzero"] < rows["dense"]["params_nonzero"]  # gates closed some weights
    assert report["hyperflux"]["curve"], "no per-step sparsity/pressure record"
    for name in ("training.png", "macs_per_layer.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "hyperflux+exprune" in out and "effective MACs" in out


def test_digits_split_is_fixed():
    from fxprune.app import data

    a, b = data.load("digits"), data.load("digits")
    assert a.shape == (3, 32, 32) and a.num_classes == 10
    assert len(a.train) + len(a.calib) + len(a.test) == 1797
    assert (a.test.x == b.test.x).all() and (a.train.y == b.train.y).all()
    syn = data.load("synthetic", size=16, channels=1)
    assert syn.shape == (1, 16, 16) and syn.num_classes == 10
    assert data.augment(a.train.x[:4]).shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("cifar10")
