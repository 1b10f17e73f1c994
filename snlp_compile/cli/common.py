"""Helpers shared by subcommands: model arguments, resolving a model, timing on the CPU, tables,
and the checks that run before any long work (optional packages, CUDA).

Nothing here imports torch at module level: building the parser (``--help``) stays fast; the
functions that need torch import it when called.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import SNLPError

DEFAULT_MODEL = "nanochat-small"  # (snlp_compile.models.DEFAULT_MODEL; a test checks they agree)
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")

# optional module -> the extra that installs it
EXTRA_OF = {
    "matplotlib": "plot",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnx",
    "safetensors": "train",
    "tokenizers": "train",
    "transformers": "hf",
}


class CLIError(SNLPError):
    """A misuse the command line reports in one line (exit status 2)."""


class MissingExtra(CLIError):
    """An optional package a command needs is not installed; the message names the extra."""


def install_hint(modules: Sequence[str]) -> str:
    extras = sorted({EXTRA_OF.get(m, "all") for m in modules})
    return f"pip install 'snlp-compile[{','.join(extras)}]' (from a source checkout: pip install -e '.[all]')"


def require(what: str, *modules: str) -> None:
    """Fail now, in one line, if a module ``what`` needs is missing (before any long work)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"{what} needs {', '.join(missing)}, which is not installed: {install_hint(missing)}"
        )


def require_device(device: str) -> None:
    """A CUDA device asked for on a machine without one fails here, in one line."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {device}: no CUDA GPU is available to torch "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu"
            )


def announce(what: str, path: object) -> None:
    """Every file a command writes is named on stdout as it is written."""
    print(f"wrote {what}: {path}", flush=True)


def status(message: str) -> None:
    """A progress line, flushed at once (terminals and log files alike)."""
    print(message, file=sys.stderr, flush=True)


def add_model_arguments(parser: argparse.ArgumentParser, *, batch: int = 2) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="built-in reference model (nanochat-tiny, nanochat-small, gpt-tiny, gpt-small, mhc-tiny, ...; "
        "an unknown name lists them all), 'module.path:factory' returning an nn.Module, a checkpoint of "
        "`snlp-compile train` or a local transformers folder",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=batch,
        help="example batch size (>= 2 keeps the batch dimension symbolic)",
    )
    parser.add_argument("--seq", type=int, default=64, help="example sequence length")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="parameter dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and example tokens")


def add_parallel_layers_argument(parser: argparse.ArgumentParser) -> None:
    """--parallel-layers (SNLPConfig.parallel_layers), worded alike in every command that rewrites."""
    parser.add_argument(
        "--parallel-layers",
        type=int,
        default=None,
        help="solve only the last N layers in parallel (default: all)",
    )


class FormerName(argparse.Action):
    """A former option name, hidden from --help, kept for one release: stores into the renamed
    option's destination and says on stderr that the option is renamed."""

    def __init__(self, option_strings: list[str], dest: str, renamed: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.renamed = renamed

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog}: {option_string} is deprecated: it is now {self.renamed}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_stages_option(parser: argparse.ArgumentParser, help: str, **kwargs: Any) -> None:
    """--stages (SNLPConfig.stages), with its former name --chunks as a hidden deprecated alias;
    giving both is an argparse error."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stages", help=help, **kwargs)
    group.add_argument("--chunks", dest="stages", action=FormerName, renamed="--stages", **kwargs)


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """--stages and --fused-layers: the two ways of grouping the parallel layers, named apart."""
    add_stages_option(
        parser,
        type=int,
        default=1,
        help="consecutive stages of the parallel layers, solved one after another (the model's own "
        "function; the paper's chunkwise decomposition is --fused-layers)",
    )
    parser.add_argument(
        "--fused-layers",
        type=int,
        default=1,
        help="M: groups of M layers as one wide layer, N/M wide layers solved in parallel (the paper's "
        "ChunkB_CxFM; changes the function: for models trained fused)",
    )


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def load_model(spec: str, dtype: Any, seed: int = 0) -> Any:
    """A built-in model by name, a user factory given as 'package.module:function', a checkpoint of
    ``snlp-compile train`` or a local `transformers` folder (as token ids -> logits, its cache off)."""
    import torch

    from ..models import MODEL_NAMES, build_model
    from ..train.checkpoint import is_checkpoint, load_checkpoint
    from ..train.hf_folder import is_transformers_path, load_transformers, token_model

    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    if is_transformers_path(spec):
        require(f"--model {spec} (a transformers folder)", "transformers")
        return token_model(load_transformers(spec, seed=seed, dtype=dtype))
    if is_checkpoint(spec) and Path(spec).exists():
        return load_checkpoint(spec, dtype=dtype)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise CLIError(f"--model {spec!r}: cannot load {attr!r} from {module_name!r}: {exc}") from exc
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise CLIError(f"--model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
        return model.to(dtype).eval()
    if spec not in MODEL_NAMES:
        raise CLIError(f"--model {spec!r}: unknown model; built-in names: {', '.join(MODEL_NAMES)}")
    return build_model(spec, seed=seed, dtype=dtype)


def example_tokens(model: Any, batch: int, seq: int, seed: int = 0) -> Any:
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", 256)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def median_time(fn: Callable[[], Any], *, warmup: int = 2, runs: int = 7) -> float:
    """Median wall time in seconds of fn() on the CPU, after warm-up."""
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
