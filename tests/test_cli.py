"""The `fxprune` command: results on stdout, one-line errors with exit code 2."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxprune
from fxprune.app.cli import main
from fxprune.report import flops
from fxprune.app.models import build, parse_shape, ModelSpecError

SCRIPT = os.path.join(os.path.dirname(sys.executable), "fxprune")
COMMAND = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "fxprune.app.cli"]

MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, c=40):
            super().__init__()
            self.conv1 = nn.Conv2d(3, c, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(c)
            self.head = nn.Linear(c, 4)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            return self.head(x.mean((2, 3)))

    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    def make():
        return Net()

    def wide():
        return Net(48)

    def branchy():
        return Branchy()
''')
C = 40
DENSE = {"conv1": 2 * 3 * C * 9 * 64, "conv2": 2 * C * C * 9 * 64, "head": 2 * C * 4}  # batch 2, 8x8


@pytest.fixture(scope="module")
def models_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "toy_models.py"
    path.write_text(MODELS)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def subprocess_runs(models_file):
    """The installed command, started when this module starts (each run imports torch: they
    overlap the in-process tests); read by the last test."""
    def start(*argv):
        return subprocess.Popen(COMMAND + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    spec = f"{models_file}:make"
    runs = {"good": start("flops", spec, "--input-shape", "2,3,8,8", "--format", "json"),
            "bad": start("flops", spec, "--input-shape", "2,3,eight,8")}
    yield runs
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def run_main(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fxprune: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# in process

def test_flops_formats_on_a_factory_file(capsys, models_file, tmp_path):
    spec = f"{models_file}:make"
    code, out, err = run_main(capsys, "flops", spec, "--input-shape", "2,3,8,8", "--format", "json")
    assert code == 0
    data = json.loads(out)
    for name, macs in DENSE.items():
        assert data["by_module"][name]["dense"] == macs
    code, out, _ = run_main(capsys, "flops", spec, "--input-shape", "2,3,8,8", "--unit", "flop", "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("module,type,depth,unit")
    assert f"conv2,Conv2d,1,flop,{2 * DENSE['conv2']}," in out
    code, out, _ = run_main(capsys, "flops", spec, "--input-shape", "2,3,8,8", "--format", "md", "--depth", "0")
    assert code == 0 and out.startswith("### FLOPs") and "`conv1`" not in out

    before = tmp_path / "before.json"
    before.write_text(json.dumps(data))
    plot = tmp_path / "bars.png"
    code, out, _ = run_main(capsys, "flops", f"{models_file}:wide", "--input-shape", "2,3,8,8",
                            "--compare", str(before), "--plot", str(plot))
    assert code == 0 and "dense before" in out and "effective after" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_with_zeros_is_counted_and_mismatch_exits_2(capsys, models_file, tmp_path):
    spec = f"{models_file}:make"
    model, _ = build(spec, [(2, 3, 8, 8)])
    state = model.state_dict()
    state["conv2.weight"][: C // 2] = 0
    good = tmp_path / "sparse.pt"
    torch.save(state, good)
    code, out, _ = run_main(capsys, "flops", spec, "--input-shape", "2,3,8,8", "--checkpoint", str(good),
                            "--format", "json")
    assert code == 0
    assert json.loads(out)["by_module"]["conv2"]["effective"] == DENSE["conv2"] / 2

    wide = build(f"{models_file}:wide", [(2, 3, 8, 8)])[0].state_dict()
    del wide["head.bias"]
    wide["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "wide.pt"
    torch.save({"state_dict": wide}, bad)
    code, out, err = run_main(capsys, "flops", spec, "--input-shape", "2,3,8,8", "--checkpoint", str(bad))
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert "does not fit" in line and "conv1.weight (48, 3, 3, 3) vs model (40, 3, 3, 3)" in line
    assert "missing keys head.bias" in line and "unexpected keys extra.weight" in line
    code, out, err = run_main(capsys, "flops", spec, "--input-shape", "2,3,8,8", "--checkpoint", str(tmp_path / "no.pt"))
    assert code == 2 and "does not exist" in one_error_line(err)


@pytest.mark.parametrize("argv,expected", [
    (["flops", "resnet18", "--input-shape", "1,3,x,32"], "malformed --input-shape '1,3,x,32'"),
    (["flops", "resnet18", "--input-shape", "1,3,0,32"], "malformed --input-shape"),
    (["flops", "pyg:GCNN"], "did you mean pyg:GCN"),
    (["flops", "pyg:GCN", "--input-shape", "1,3,32,32"], "num_nodes,num_features"),
    (["flops", "no_such_module_xyz:make", "--input-shape", "1,3"], "cannot import module 'no_such_module_xyz'"),
    (["flops", "resnt18", "--input-shape", "1,3,32,32"], "did you mean resnet18"),
    (["flops", "tests/no_such_file.py:make", "--input-shape", "1,3"], "no such file"),
    (["flops", "resnet18", "--unit", "gflop"], "invalid choice"),
    (["flops"], "required: model"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, expected):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert expected in one_error_line(err)


def test_untraceable_and_unfitting_models_exit_2(capsys, models_file):
    code, _, err = run_main(capsys, "analyze", f"{models_file}:branchy", "--input-shape", "1,3")
    assert code == 2 and "torch.fx cannot trace" in one_error_line(err)
    code, _, err = run_main(capsys, "flops", f"{models_file}:make", "--input-shape", "2,5,8,8")
    assert code == 2 and "could not trace" in one_error_line(err)
    code, _, err = run_main(capsys, "flops", f"{models_file}:nothing", "--input-shape", "2,3,8,8")
    assert code == 2 and "has no attribute 'nothing'" in one_error_line(err)


def test_analyze_table_and_json(capsys, models_file):
    spec = f"{models_file}:make"
    code, out, _ = run_main(capsys, "analyze", spec, "--input-shape", "2,3,8,8")
    assert code == 0 and out.startswith(f"fxprune analysis of {spec}")
    code, out, _ = run_main(capsys, "analyze", spec, "--input-shape", "2,3,8,8", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["model"] == spec and data["input_shapes"] == [[2, 3, 8, 8]]


def test_pyg_model_json_total_equals_library(capsys):
    code, out, _ = run_main(capsys, "flops", "pyg:GAT", "--input-shape", "30,8", "--format", "json")
    model, inputs = build("pyg:GAT", [(30, 8)])
    assert code == 0 and json.loads(out)["dense"] == flops(model, inputs).dense > 0


def test_exprune_threshold_wraps_the_model(capsys, models_file):
    spec = f"{models_file}:make"
    code, out, err = run_main(capsys, "flops", spec, "--input-shape", "2,3,8,8", "--exprune-threshold", "-inf",
                              "--format", "json")
    assert code == 0, err
    safe = json.loads(out)
    assert safe["exprune_ops"] and safe["effective"] == safe["dense"]  # nothing pruned, no test overhead
    code, out, _ = run_main(capsys, "flops", spec, "--input-shape", "2,3,8,8", "--exprune-threshold", "inf",
                            "--format", "json")
    pruned = json.loads(out)
    assert code == 0 and pruned["dense"] == safe["dense"] and pruned["effective"] < safe["effective"]


def test_demo_dispatch(capsys, monkeypatch):
    if importlib.util.find_spec("fxprune.app.demo") is not None:
        code, out, _ = run_main(capsys, "demo", "--help")  # fxprune.app.demo.main parses its own arguments
        assert code == 0 and "fxprune demo" in out
    monkeypatch.setitem(sys.modules, "fxprune.app.demo", None)  # as if fxprune/app/demo.py were absent
    code, out, err = run_main(capsys, "demo", "--anything")
    assert code == 2 and "fxprune demo is not available" in one_error_line(err)


def test_parse_shape():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224) and parse_shape(" 100, 16 ") == (100, 16)
    with pytest.raises(ModelSpecError):
        parse_shape("")


# ---------------------------------------------------------------------------------------------
# the installed command, in subprocesses (started by the subprocess_runs fixture)

def test_cli_subprocess_json_total_equals_library_and_bad_shape_exits_2(models_file, subprocess_runs):
    spec = f"{models_file}:make"
    good, bad = subprocess_runs["good"], subprocess_runs["bad"]
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    data = json.loads(out)  # stdout is exactly the JSON document
    model, inputs = build(spec, [(2, 3, 8, 8)])
    report = flops(model, inputs, name=spec)
    assert data["dense"] == report.dense == sum(DENSE.values()) + data["by_operator"]["batch_norm"]["dense"]
    assert data == json.loads(report.to_json())

    bad_out, bad_err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and bad_out == ""
    assert "malformed --input-shape '2,3,eight,8'" in one_error_line(bad_err)
