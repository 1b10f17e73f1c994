"""The `snlp-compile` command line: one module per subcommand, each with add_arguments() and run().

Building the parser imports no torch (the subcommands import what they need inside run()), so
``--help`` and ``--version`` answer at once. Errors the compiler raises on purpose (SNLPError),
missing optional packages, missing files and a missing CUDA device are reported in one line;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> (module under snlp_compile.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "rewrite the default model (random weights, CPU), explain it, logits error against K"),
    "inspect": ("inspect_cmd", "the explain report, the rewritten code and a picture of the chain"),
    "train": ("train", "train a reference model (baseline, SNLP regulariser or SNLP-forward fine-tune)"),
    "eval": ("eval", "held-out perplexity of checkpoints, sequential and through SNLP solves, with a plot"),
    "export": ("export", "ONNX or AOTInductor export of the rewritten model or decode step, with --check"),
    "generate": (
        "generate_cmd",
        "generate tokens: sequential, SNLP decode, or lossless speculative decoding",
    ),
    "bench": ("bench", "print the command that runs the GPU benchmarks from a source checkout"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults on every option, descriptions kept as written; a help text that names its default
    itself (``default: 20% of --steps``) is not followed by argparse's ``(default: None)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def version() -> str:
    from .. import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snlp-compile",
        description="Rewrite a Transformer's residual layer chain into a layer-parallel SNLP solve.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"snlp-compile {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_line) in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        p = sub.add_parser(name, help=help_line, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        p.set_defaults(_run=module.run)
    return parser


def _one_line(exc: BaseException) -> str | None:
    """The one-line message of an error the command line expects, else None (a bug: traceback)."""
    from ..errors import SNLPError
    from .common import install_hint

    text = " ".join(str(exc).split())
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        return f"the package {top!r} is not installed: {install_hint([top])}"
    if (
        "CUDA" in text
        and isinstance(exc, (AssertionError, RuntimeError))
        and ("not compiled with CUDA" in text or "no CUDA" in text.lower() or "CUDA driver" in text)
    ):
        return f"this needs a CUDA GPU and torch sees none ({text})"
    if isinstance(exc, SNLPError):
        return text if type(exc).__name__ in ("CLIError", "MissingExtra") else f"{type(exc).__name__}: {text}"
    if isinstance(exc, (OSError, ValueError, ImportError)):
        return f"{type(exc).__name__}: {text}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"snlp-compile {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = None if args.debug else _one_line(exc)
        if message is None:
            raise
        from .common import CLIError

        hint = "" if isinstance(exc, CLIError) else " (--debug shows the traceback)"
        print(f"snlp-compile {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2 if isinstance(exc, CLIError) else 1


if __name__ == "__main__":
    sys.exit(main())
