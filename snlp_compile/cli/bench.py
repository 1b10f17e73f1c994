"""Run a GPU benchmark regime from the repository's benchmarks/ folder (forward or decode), or
read issue 6's speed targets off their result files (targets).

    snlp-compile bench forward --shapes 0.5b --seq 2048
    snlp-compile bench decode --batch 1 --ks 1,2
    snlp-compile bench decode -- --help        # the regime's own options
    snlp-compile bench targets benchmarks/results/decode_05b_r12.json ... [--strongest-baseline]

Arguments after the regime go to the regime's script unchanged; results land in $OUT or
benchmarks/results (JSON, markdown table, plot). The scripts live beside the package in a source
checkout, not in an installed wheel.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REGIMES = ("forward", "decode", "targets")


def benchmarks_dir() -> Path:
    """benchmarks/ of the source checkout this package was imported from."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("regime", choices=REGIMES, help="which benchmark script to run")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="options passed to the script")


def run(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    script = folder / f"{args.regime}.py"
    if not script.is_file():
        print(
            f"snlp-compile bench: {script} not found; the benchmarks ship with the source checkout "
            "(run from a clone of the repository, with the package installed from it)",
            file=sys.stderr,
        )
        return 2
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # the scripts import their shared common.py
    spec = importlib.util.spec_from_file_location(f"snlp_bench_{args.regime}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses defined in a script look their module up there)
    spec.loader.exec_module(module)
    rest = [a for a in args.script_args if a != "--"] if args.script_args[:1] == ["--"] else args.script_args
    return int(module.main(rest) or 0)
