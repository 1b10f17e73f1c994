"""Say how to run the GPU benchmarks: ``python -m benchmarks ...`` from a source checkout.

The benchmarks are not part of the installed package: they live in a checkout's ``benchmarks/``
folder and run from its root (decode, forward, targets, step-timeline, ...; BENCHMARKS.md).
``snlp-compile bench ARGS`` prints that command with ARGS in it and runs nothing.
"""

from __future__ import annotations

import argparse
import shlex


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs=argparse.REMAINDER, help="a benchmark sub-command and its options")


def run(args: argparse.Namespace) -> int:
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    line = shlex.join(["python", "-m", "benchmarks", *(rest or ["--help"])])
    print(f"snlp-compile bench: the benchmarks ship with the source checkout; from its root run: {line}")
    return 2 if rest else 0
