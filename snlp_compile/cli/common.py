"""Helpers shared by subcommands: resolving a model argument, timing on the CPU, tables."""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models import DEFAULT_MODEL, MODEL_NAMES, build_model

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in name ({', '.join(MODEL_NAMES)}) or 'module.path:factory' returning an nn.Module",
    )
    parser.add_argument("--batch", type=int, default=1, help="example batch size")
    parser.add_argument("--seq", type=int, default=64, help="example sequence length")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)


def load_model(spec: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A built-in model by name, or a user factory given as 'package.module:function'."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"--model {spec!r}: cannot load {attr!r} from {module_name!r}: {exc}") from exc
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(
                f"--model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
            )
        return model.to(dtype).eval()
    if spec not in MODEL_NAMES:
        raise SystemExit(f"--model {spec!r}: unknown model; built-in names: {', '.join(MODEL_NAMES)}")
    return build_model(spec, seed=seed, dtype=dtype)


def example_tokens(model: torch.nn.Module, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", 256)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def median_time(fn: Callable[[], Any], *, warmup: int = 2, runs: int = 7) -> float:
    """Median wall time in seconds of fn() on the CPU, after warm-up."""
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
