"""The benchmark suite's quick variant end to end (real data; `make bench-data` puts it in place)."""
import pytest

from benchmarks.suite import data as bench_data
from benchmarks.suite.run import HEADINGS, run


def require_data() -> None:
    """Fail (never skip) with what to do when a data set is missing."""
    try:
        bench_data.fashion_mnist()
        bench_data.molecules()
        bench_data.austen(32)
    except bench_data.DataMissing as e:
        pytest.fail(f"benchmark data missing: {e}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_suite_writes_every_section(tmp_path):
    require_data()
    out = tmp_path / "BENCHMARKS.md"
    suite = run(["--quick", "--out", str(out)])  # threads: 2, or 1 when the machine is busy

    methods = {name: {r["method"] for r in rows} for name, rows in suite.rows.items()}
    assert methods["weight"] == {"dense", "Hyperflux weight", "Hyperflux weight, paper controller", "global magnitude"}
    assert methods["channel"] == {"dense", "Hyperflux channel + export", "Torch-Pruning magnitude",
                                  "Torch-Pruning Taylor"}
    assert {r["model"] for r in suite.rows["exprune"]} == {"vgg11_bn", "gcn", "opt"}

    for name, rows in suite.rows.items():
        for r in rows:
            assert 0.0 <= r["accuracy"] <= 1.0, (name, r)
            assert r["macs"] <= r["dense_macs"] * (1 + 1e-9), (name, r)
    dense = {r["model"]: r["macs"] for r in suite.rows["weight"] if r["method"] == "dense"}
    assert set(dense) == {"vgg11_bn", "gcn", "opt"}
    for r in suite.rows["weight"]:
        # the defaults (exact_target) and magnitude end on the target; the paper's controller may
        # prune nothing in the quick variant's few steps, so it is only bounded
        if r["method"] in ("Hyperflux weight", "global magnitude"):
            assert r["macs"] < dense[r["model"]] and r["sparsity"] > 0.5, r
        assert r["macs"] <= dense[r["model"]] * (1 + 1e-9), r
    channel_dense = next(r for r in suite.rows["channel"] if r["method"] == "dense")
    for r in suite.rows["channel"]:
        if r["method"] != "dense":
            assert r["macs"] < 0.75 * channel_dense["macs"] and r["params"] < channel_dense["params"], r
            assert r["latency_b1"] > 0 and r["latency_b64"] > 0
    for r in suite.rows["exprune"]:
        assert r["saved"] < 1.0 and r["seconds"] > 0

    text = out.read_text()
    for heading in HEADINGS.values():
        assert heading in text
    assert text.count("Command: `python -m benchmarks.suite --quick") == 3
    assert "Seeds: 0" in text and "| Hyperflux channel + export | 50 %" in text
