"""``medadapt bench perf``: the performance benchmarks of ``benchmarks/run.py``.

The benchmarks measure against torch and against other methods with the repository's own
scripts, which are not part of the installed package; the command runs them from the source
checkout that this package was installed from (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs")
    parser.add_argument("--only", nargs="+", metavar="SECTION",
                        help="run only these sections (dwconv, step, memory, cache, window, demo, allocator, stem)")
    parser.add_argument("--out", help="folder for the tables (default benchmarks/results)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not RUNNER.is_file():
        raise FileNotFoundError(f"{RUNNER} not found: medadapt bench perf runs the benchmarks of a source "
                                "checkout (git clone, then pip install -e .)")
    command = [sys.executable, str(RUNNER)]
    if args.quick:
        command.append("--quick")
    if args.only:
        command += ["--only", *args.only]
    if args.out:
        command += ["--out", str(args.out)]
    return subprocess.run(command).returncode
