"""The `snlp-compile` command line: one module per subcommand, each with add_parser() and run()."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under snlp_compile.cli (each defines add_arguments(parser) and run(args))
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "inspect": "inspect_cmd",
    "train": "train",
    "eval": "eval",
    "export": "export",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snlp-compile",
        description="Rewrite a Transformer's residual layer chain into a layer-parallel SNLP solve.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0] if module.__doc__ else None)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
