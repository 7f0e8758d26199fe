"""Smoke tests of the benchmark scripts' --quick modes (in-process, one through a subprocess) and of
the BENCHMARKS.md section writer."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def _script(name: str):
    return importlib.import_module(name)


def test_write_section_replaces_only_its_own_section(tmp_path):
    common = _script("_common")
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n## ExPrune trade-off\n\nold exprune\n\n## Analysis time\n\nold\n\n"
                    "## timm coverage\n\nx\n")
    common.write_section(common.section("## Analysis time", "cmd --a", ["new row"]), path)
    text = path.read_text()
    assert "old exprune" in text and "## timm coverage\n\nx" in text and "\nold\n" not in text
    assert text.count("## Analysis time") == 1 and "new row" in text and "`cmd --a`" in text
    common.write_section(common.section("## Compile timings", "cmd", ["row"]), path)
    assert path.read_text().rstrip().endswith("row")
    with pytest.raises(ValueError):
        common.section("Compile timings", "cmd", [])


@pytest.mark.slow
def test_analysis_time_quick_subprocess(tmp_path):
    out = tmp_path / "B.md"
    run = subprocess.run([sys.executable, str(BENCH / "analysis_time.py"), "--quick", "--benchmarks", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    assert "## Analysis time" in text and "| resnet18 | 1x3x64x64 |" in text and "Command:" in text


@pytest.mark.slow
@pytest.mark.parametrize("name, heading", [
    ("hyperflux_vs_magnitude", "## Hyperflux vs magnitude pruning"),
    ("channel_export_latency", "## Channel export latency"),
    ("compile_timings", "## Compile timings"),
])
def test_quick_mode_in_process(name, heading, tmp_path):
    out = tmp_path / "B.md"
    assert _script(name).main(["--quick", "--benchmarks", str(out), "--threads", "2"]
                              + (["--no-progress"] if name != "compile_timings" else [])) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks") and heading in text and "Machine:" in text and "Date:" in text
    assert "| " in text.split(heading, 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize("name, heading, row", [
    ("bench_sparse_crossover", "## CSR crossover", "| 256 -> 256 | 1 |"),
    ("bench_deploy_weights", "## Weight deployment passes", "| mlp | 90% |"),
])
def test_deploy_weight_benchmarks_quick(name, heading, row, tmp_path):
    out = tmp_path / "B.md"
    assert _script(name).main(["--quick", "--benchmarks", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    assert heading in text and "Command:" in text and row in text
