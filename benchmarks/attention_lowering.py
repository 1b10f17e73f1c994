"""How a decode step's attention over the caches is lowered, all layers at once: the reference
models' ``cached_attention`` (two products over the cache, one softmax with the new token's score
beside it) on layer-batched operands, compiled and captured in a CUDA graph.

    python -m benchmarks attention-lowering                                 # on a GPU
    python -m benchmarks attention-lowering --device cpu --shapes tiny      # smoke run

Lowerings of the two cache products (same inputs, same result up to rounding):
  matmul   ``torch.matmul`` (ATen ``bmm``, cuBLAS)
  kernel   ``kernels.layer_matmul``: the layer-batched GEMV kernel reading the caches
           through their strides (what the compiler emits)
  mulsum   broadcast product and sum, left to Inductor as a reduction it can fuse with the softmax
  fused    the whole attention as one kernel (``kernels.decode_attention``), without and with PDL
           (``fused-pdl``)
Each under Inductor's defaults and under ``max-autotune``; the bytes floor is both caches read once.
``--per-layer`` times the sequential step's pattern instead: one call per layer, in order.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch

from snlp_compile.cuda_graph import capture
from snlp_compile.kernels import decode_attention
from snlp_compile.kernels.layer_ops import layer_matmul
from snlp_compile.models.kv import attention_bias, attention_ops

from . import common

# name -> (layers, heads, head dim): the decode benchmark's shapes (batch 1, MHA)
SHAPES = {"0.5b": (32, 10, 64), "d20": (20, 10, 128), "tiny": (4, 2, 16)}


def _mulsum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


# name -> the batched matmul attention_ops runs with; None: a fused kernel instead (lowering_fn)
LOWERINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "matmul": torch.matmul,
    "kernel": layer_matmul,
    "mulsum": _mulsum,
    "fused": None,
    "fused-pdl": None,
}


def lowering_fn(name: str) -> Any:
    """The attention (q, k, v, k_cache, v_cache, bias) -> out under lowering ``name``."""
    if name.startswith("fused"):
        return functools.partial(decode_attention.attention, pdl=name == "fused-pdl")
    matmul = LOWERINGS[name]
    assert matmul is not None  # (every lowering without a matmul is fused)
    return functools.partial(attention_ops, matmul=matmul)


def per_layer(fn: Any, layers: int) -> Any:
    """``fn`` called once per layer on that layer's slice, in order (the sequential step)."""

    def run(q: Any, k: Any, v: Any, k_cache: Any, v_cache: Any, bias: Any) -> list[Any]:
        return [
            fn(q[i : i + 1], k[i : i + 1], v[i : i + 1], k_cache[i : i + 1], v_cache[i : i + 1], bias)
            for i in range(layers)
        ]

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b,d20", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--lowerings", default=",".join(LOWERINGS))
    p.add_argument("--modes", default="compiled,autotuned")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help=common.OUT_HELP)
    p.add_argument("--name", default="attention_lowering")
    p.add_argument("--per-layer", action="store_true", help="one call per layer (the sequential step)")
    p.add_argument("--programs-per-sm", default="", help="fused rows at each PROGRAMS_PER_SM")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = common.out_dir_from(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = common.copy_bandwidth(device)
    rows: list[dict[str, object]] = []
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        layers, heads, dim = SHAPES[shape]
        t_max = args.context
        # the layer axis folded into the batch axis, as the rewritten step's operands are
        k_cache = torch.randn(layers, heads, t_max, dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        q, k, v = (torch.randn(layers, heads, 1, dim, device=device, dtype=dtype) for _ in range(3))
        bias = attention_bias(torch.tensor(t_max - 1, device=device), 1, t_max)
        floor_us = common.floor_ms(2 * k_cache.numel() * k_cache.element_size(), bw) * 1e3
        ref = attention_ops(
            q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), bias.double()
        )
        variants: list[tuple[str, int | None]] = []
        for lowering in args.lowerings.split(","):
            if lowering.startswith("fused") and device.type != "cuda":
                continue  # a GPU kernel
            sm_counts = (
                [int(x) for x in args.programs_per_sm.split(",") if x] if lowering.startswith("fused") else []
            )
            variants += [(lowering, p) for p in sm_counts] or [(lowering, None)]
        for lowering, per_sm in variants:
            if per_sm is not None:
                decode_attention.PROGRAMS_PER_SM = per_sm
            for mode in args.modes.split(","):
                fn = lowering_fn(lowering)
                if args.per_layer:
                    fn = per_layer(fn, layers)
                compiled = common.compile_module(fn, autotune=mode == "autotuned")
                call = functools.partial(compiled, q, k, v, k_cache, v_cache, bias)
                with torch.no_grad():
                    got = call()
                    got = torch.cat(got) if isinstance(got, list) else got
                    err = float((got.double() - ref).norm() / ref.norm())
                    run = capture(call, device) if device.type == "cuda" else call
                    t = common.time_fn(run, device, warmup=20, samples=200)
                row = {"shape": shape + (" per layer" if args.per_layer else ""), "mode": mode}
                row["lowering"] = lowering + ("" if per_sm is None else f" {per_sm}/SM")
                row.update(
                    median_us=t.median_ms * 1e3, floor_us=floor_us, x_floor=t.median_ms * 1e3 / floor_us
                )
                row["rel_err"] = err
                if lowering.startswith("fused"):
                    row["config"] = str(decode_attention._decode_attention_tuned.best_config)
                rows.append(row)
                print(
                    f"{shape:>5} {lowering:<7} {mode:<10} {row['median_us']:8.2f} us  x floor "
                    f"{row['x_floor']:.2f}  rel_err {err:.1e} {row.get('config', '')}"
                )
    meta: dict[str, Any] = {"env": common.environment(device), "copy_bandwidth_tbs": bw / 1e12}
    meta["command"] = common.command("attention-lowering", argv)
    title = (
        "## Decode attention over the caches, all layers at once (compiled + CUDA graph)\n\n"
        f"Device: {common.device_label(meta['env'])}, copy bandwidth {bw / 1e12:.2f} TB/s, "
        f"context {args.context}, batch 1"
    )
    columns = "shape lowering mode median_us:.2f floor_us:.2f x_floor:.2f rel_err:.1e"
    print(common.write_table(out, args.name, meta, rows, title, columns))
    return 0
