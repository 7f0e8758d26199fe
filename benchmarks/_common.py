"""Shared by the benchmark scripts: the BENCHMARKS.md section writer, the command line, timing helpers.

Each script owns one ``## <heading>`` section of BENCHMARKS.md. :func:`write_section` replaces it
(from the heading to the next ``## `` heading or the end of the file) or appends it, the same
semantics as ``exprune_tradeoff.py`` and ``timm_coverage.py``, so the scripts can run in any order.
Every section starts with the date, the machine and the command that produced it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from fxprune.app.demo import default_threads, machine  # noqa: E402


def parser(doc: str) -> argparse.ArgumentParser:
    """argparse with the options every benchmark script has: --quick, --benchmarks, --threads."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--quick", action="store_true", help="tiny sizes (< 60 s); prints, writes nothing unless "
                   "--benchmarks is given")
    p.add_argument("--benchmarks", type=Path, default=None,
                   help="markdown file whose section to replace (default: BENCHMARKS.md, not with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2, or 1 when the machine is already busy)")
    return p


def training_run(doc: str, argv, quick: dict, full: dict, targets_help: str) -> tuple[argparse.Namespace, dict]:
    """Parse the options of a pruning benchmark (--quick, --targets, --no-progress, ...), set the
    threads; return the arguments and a copy of the ``quick`` or ``full`` settings with the targets."""
    p = parser(doc)
    p.add_argument("--targets", nargs="+", type=float, help=targets_help)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    setup(args)
    cfg = dict(quick if args.quick else full)
    if args.targets:
        cfg["targets"] = tuple(args.targets)
    return args, cfg


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, args.threads or default_threads()))


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run, from the repository root."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([".venv/bin/python", f"benchmarks/{script}", *args])


def header(command_line: str, note: str = "") -> list[str]:
    """First lines of a section: date (UTC), machine, command; an optional note on the load."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Date: {now}. Machine: {machine()}. Command: `{command_line}`."]
    if note:
        lines.append(note)
    return lines


def section(heading: str, command_line: str, body: Sequence[str], note: str = "") -> str:
    """A complete ``## heading`` section: header lines, a blank line, ``body``."""
    if not heading.startswith("## "):
        raise ValueError(f"a BENCHMARKS.md section heading starts with '## ', got {heading!r}")
    return "\n".join([heading, "", *header(command_line, note), "", *body]).rstrip("\n") + "\n"


def write_section(text: str, path: Path = BENCHMARKS) -> Path:
    """Replace the section whose heading is the first line of ``text`` in ``path`` (or append it)."""
    heading = text.split("\n", 1)[0]
    path = Path(path)
    with _locked(path):
        old = path.read_text() if path.exists() else "# Benchmarks\n"
        pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
        new = (pattern.sub(lambda _: text + "\n", old) if pattern.search(old)
               else old.rstrip("\n") + "\n\n" + text)
        path.write_text(new)
    return path


def finish(args: argparse.Namespace, text: str) -> None:
    """Print the section; write it to --benchmarks, or to BENCHMARKS.md when not --quick."""
    print(text)
    target = args.benchmarks or (None if args.quick else BENCHMARKS)
    if target is not None:
        write_section(text, target)
        print(f"updated {target}")


def report(args: argparse.Namespace, heading: str, script: str, argv, body: Sequence[str]) -> int:
    """Finish a script: its section (header with the load note, then ``body``) printed and written
    as :func:`finish` does; returns 0, the script's exit status."""
    finish(args, section(heading, command(script, argv), body, load_note()))
    return 0


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock (a file in the temp folder) so that two scripts do not interleave rewrites."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"fxprune-benchmarks-{digest}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_note() -> str:
    """A sentence on the machine's load (1-minute load average vs cores), for noisy timings."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    busy = " (shared: other jobs were running, timings are noisy)" if load > 0.75 * cores else ""
    return f"1-min load average at the end of the run: {load:.1f} on {cores} cores{busy}."


def median_time(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median time of ``fn()`` in seconds after ``warmup`` untimed calls: wall time, or this thread's
    CPU time when torch runs on one thread (then the other jobs of a shared machine do not inflate
    it: the work runs in the calling thread)."""
    import torch

    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Lines of a markdown table with header ``head`` and one line per row (cells printed with str)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def human(count: float) -> str:
    """1234567 -> '1.23 M', 45600 -> '45.6 K'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {suffix}"
    return f"{count:.3g}"


def dense_model(data, split, width: float, epochs: int, *, arch: str = "resnet18", seed: int = 0,
                progress: bool = True):
    """A dense timm ResNet trained on ``split`` (cached in the temp folder, keyed by the settings,
    so that the scripts share one checkpoint); returned in eval mode."""
    from fxprune.app.demo import build_model, train

    model = build_model(arch, data.num_classes, width, seed)
    key = f"{arch}-w{width}-e{epochs}-n{len(split)}-{data.name}-s{seed}-torch{torch.__version__}"
    cache = Path(tempfile.gettempdir()) / "fxprune-bench" / f"{key}.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        print(f"dense checkpoint: {cache} (cached)", flush=True)
    else:
        train(model, split, epochs, lr=0.1, seed=seed, desc="dense", progress=progress)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model.eval()
