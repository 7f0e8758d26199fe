"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and they catch violations.

The real tree is checked as it is; then, for each contract, a copy of the package with one
forbidden import injected shows that the contract reports that import.
"""
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = {c["id"]: c["name"] for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]}

# (contract id, module file in the copy, line appended to it, import that must be reported)
INJECTED = [
    ("core-without-integrations", "capture.py", "import fxprune.integrations.timm",
     "fxprune.capture -> fxprune.integrations.timm"),
    ("layers", "analysis/__init__.py", "import fxprune.runtime", "fxprune.analysis -> fxprune.runtime"),
    ("transforms-independent", "exprune/__init__.py", "import fxprune.hyperflux", "fxprune.exprune -> fxprune.hyperflux"),
    ("integrations-independent", "integrations/timm.py", "import fxprune.integrations.pyg",
     "fxprune.integrations.timm -> fxprune.integrations.pyg"),
    ("app-on-top", "runtime.py", "import fxprune.app.models", "fxprune.runtime -> fxprune.app.models"),
    ("import-fxprune", "errors.py", "import fxprune.app.cli", "fxprune.errors -> fxprune.app.cli"),
]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on the package found first on ``cwd`` with the config in ``cwd``."""
    assert LINT_IMPORTS.exists(), f"import-linter is not installed next to {sys.executable} (pip install -e '.[dev]')"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(cwd / "pyproject.toml")], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def broken_sections(output: str) -> dict[str, str]:
    """Report text of each broken contract, by contract name (the part after 'Broken contracts')."""
    lines = output.split("Broken contracts", 1)[-1].splitlines()
    sections, name = {}, None
    for i, line in enumerate(lines):
        if line in CONTRACTS.values() and i + 1 < len(lines) and set(lines[i + 1]) == {"-"}:
            name = line
            sections[name] = ""
        elif name is not None:
            sections[name] += line + "\n"
    return sections


def test_every_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout


def test_every_contract_has_an_injected_violation():
    assert sorted(contract for contract, *_ in INJECTED) == sorted(CONTRACTS)


@pytest.mark.parametrize("contract, module, line, chain", INJECTED, ids=[i[0] for i in INJECTED])
def test_contract_reports_an_injected_import(tmp_path, contract, module, line, chain):
    shutil.copytree(ROOT / "fxprune", tmp_path / "fxprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    with open(tmp_path / "fxprune" / module, "a") as f:
        f.write(f"\n{line}  # injected by test_import_contracts\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert chain in broken_sections(result.stdout).get(CONTRACTS[contract], ""), \
        f"{contract} did not report {chain}:\n{result.stdout}"


def test_import_fxprune_loads_no_optional_library():
    optional = ["matplotlib", "sklearn", "timm", "torch_geometric", "torchvision"]  # the extras' libraries
    code = f"import sys, fxprune; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(optional)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]"], f"import fxprune imports {result.stdout.strip()}, which only extras provide"
