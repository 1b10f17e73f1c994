"""How the layer-batched linear of a decode step is lowered: one row per layer times stacked
weights (N, O, I), preceded by the RMS norm that produces the row, compiled and captured in a CUDA
graph: the op that dominates a batch-1 SNLP decode step.

    python -m benchmarks gemv-lowering                                   # on a GPU
    python -m benchmarks gemv-lowering --device cpu --shapes 4x256x64    # smoke run
    python -m benchmarks gemv-lowering --sweep --sweep-cold ...          # the kernel's launch configs
    ncu --profile-from-start off ... python -m benchmarks gemv-lowering --ncu-probe

Variants (same inputs, same result up to rounding):
  einsum        ``torch.einsum`` (cuBLAS batched GEMM), one row per layer
  kernel        the compiler's ``batched_linear``: the layer-batched GEMV Triton kernel
                (``snlp_compile.kernels.layer_gemv``), one row per layer
  einsum-rows2  two rows per layer (cuBLAS' bmm wrapper copies a one-row operand, not two rows)
  einsum-rows8, kernel-rows8   eight rows per layer (decoding at batch 8)
For each: median time (CUDA events), copies (aten::clone) per call from the profiler, and the
bytes floor (the weights read once at the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from snlp_compile.cuda_graph import capture
from snlp_compile.kernels.layer_ops import batched_linear

from . import common


def _variants() -> dict[str, tuple[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]:
    """name -> (rows per layer, fn(x_raw (N, R, I), w (N, O, I)) -> (N, R, O))."""

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],))

    def einsum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("n...i,noi->n...o", norm(x), w)

    def kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return batched_linear(norm(x), w)

    return {
        "einsum": (1, einsum),
        "kernel": (1, kernel),
        "einsum-rows2": (2, einsum),
        "einsum-rows8": (8, einsum),
        "kernel-rows8": (8, kernel),
    }


def _clones_per_call(fn: Callable[[], Any], calls: int = 5) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::clone") / calls


CHAIN, COPIES = 24, 4  # --sweep-cold: launches per CUDA graph, operand copies cycled through


def _chain(fn, operands: list[tuple[torch.Tensor, torch.Tensor]]):
    """``CHAIN`` calls of fn(x, w) cycling over the operand copies (a cold-L2 timing: together the
    copies are larger than L2, so no launch finds its operand there)."""

    def run() -> torch.Tensor:
        for c in range(CHAIN):
            y = fn(*operands[c % len(operands)])
        return y

    return run


def _weights(shape: str, n: int, o: int, i: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """w (N, O, I) of a sweep shape; ``...t``: stored (N, I, O) and read transposed (a values cache)."""
    if shape.endswith("t"):
        return torch.randn(n, i, o, device=device, dtype=dtype).transpose(1, 2) / i**0.5
    return torch.randn(n, o, i, device=device, dtype=dtype) / i**0.5


def _timed_us(
    fn, operands: list[tuple[torch.Tensor, torch.Tensor]], cold: bool, device: torch.device
) -> float:
    """Median us of one fn(x, w) in a CUDA graph: a chain over the copies (cold), or one launch."""
    call = _chain(fn, operands) if cold else functools.partial(fn, *operands[-1])
    return (
        common.time_fn(capture(call, device), device, warmup=5, samples=50).median_ms
        * 1e3
        / (CHAIN if cold else 1)
    )


def sweep(
    shapes: str,
    device: torch.device,
    dtype: torch.dtype,
    out: Path,
    name: str,
    row_counts: tuple[int, ...] = (1, 8),
    stages: tuple[int, ...] = (1, 2, 3),
    cold: bool = False,
) -> None:
    """Time the kernel's bare tile over a grid of launch configs (CUDA graph of one launch) beside
    the einsum, for each row count (1: batch-1 decode, 2: deferred K/V, 8: batch 8): what the
    kernel can reach per shape, and which configs to autotune. A shape ending in ``t`` stores w
    transposed, (N, I, O) read as (N, O, I): the values cache in a decode step's attention.

    ``cold``: each timing is per launch in a chain of ``CHAIN`` launches over
    ``COPIES`` operand copies in one CUDA graph, so operands come from DRAM as in a step (a 42 MB
    values cache mostly fits the H200's L2 when one launch is replayed), and the autotuned op
    (``torch.ops.snlp.layer_gemv``, the configs the compiler ships) is timed the same way."""
    from snlp_compile.kernels import layer_gemv as lg

    bw = common.copy_bandwidth(device)
    configs = itertools.product((4, 8, 16, 32, 64, 128), (64, 128, 256, 512), (2, 4, 8), stages)
    grid = [(bo, bi, nw, ns) for bo, bi, nw, ns in configs if 512 <= bo * bi <= 16384]
    result: list[dict[str, object]] = []
    for shape in shapes.split(","):
        n, o, i = (int(v) for v in shape.rstrip("t").split("x"))
        ws = [_weights(shape, n, o, i, device, dtype) for _ in range(COPIES if cold else 1)]
        w = ws[-1]
        floor_us = common.floor_ms(w.numel() * w.element_size(), bw) * 1e3
        for r in row_counts:
            operands = [(torch.randn(n, r, i, device=device, dtype=dtype), wc) for wc in ws]
            x = operands[-1][0]
            ref = torch.einsum("nri,noi->nro", x, w)
            t_einsum = _timed_us(functools.partial(torch.einsum, "nri,noi->nro"), operands, cold, device)
            t_shipped = _timed_us(torch.ops.snlp.layer_gemv, operands, cold, device)
            timed = []
            for bo, bi, nw, ns in grid:
                tile = functools.partial(
                    lg.launch, lg._layer_gemv_tile, BLOCK_O=bo, BLOCK_I=bi, num_warps=nw, num_stages=ns
                )
                try:
                    y = tile(x, w)
                    if not torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2):
                        continue
                    timed.append((_timed_us(tile, operands, cold, device), (bo, bi, nw, ns)))
                except Exception:  # a config that does not compile (registers, shared memory) is skipped
                    continue
            timed.sort()
            best = [dict(us=t, BLOCK_O=c[0], BLOCK_I=c[1], warps=c[2], stages=c[3]) for t, c in timed[:5]]
            row = dict(
                shape=shape, rows=r, cold=cold, einsum_us=t_einsum, shipped_us=t_shipped, floor_us=floor_us
            )
            row["best"] = best
            result.append(row)
            tops = "; ".join(
                f"{b['us']:.2f} ({b['BLOCK_O']},{b['BLOCK_I']},{b['warps']},{b['stages']})" for b in best
            )
            print(
                f"{shape:>14} rows {r}: einsum {t_einsum:.1f} us, shipped (autotuned) {t_shipped:.2f} us,",
                end="",
            )
            print(f" floor {floor_us:.1f}; best {tops}")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))


def ncu_probe() -> None:
    """One launch each of a 0.5B decode step's values and keys products on the GEMV kernel
    (autotuned first, outside the profiled range), for Nsight Compute (--profile-from-start off)."""
    from snlp_compile.kernels import layer_gemv  # noqa: F401  (registers the op)

    torch.manual_seed(0)
    cache = torch.randn(320, 1024, 64, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(320, 1, 1024, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(320, 1, 64, device="cuda", dtype=torch.bfloat16)
    for profiled in (False, False, False, True):  # autotune, steady launches, then the profiled one
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        torch.ops.snlp.layer_gemv(probs, cache.transpose(1, 2))  # values: w (320, 64, 1024) transposed
        torch.ops.snlp.layer_gemv(q, cache)  # keys: w (320, 1024, 64)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shapes = (
        "20x5120x1280,20x3840x1280,20x1280x5120,20x2560x1280,32x1920x640,32x640x640,32x2560x640,32x640x2560"
    )
    p.add_argument("--shapes", default=shapes, help="NxOxI list")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help=common.OUT_HELP)
    p.add_argument("--name", default="gemv_lowering")
    p.add_argument("--sweep", action="store_true", help="time the kernel over launch configs instead")
    p.add_argument("--sweep-rows", default="1,8", help="rows per layer the sweep times")
    p.add_argument("--sweep-stages", default="1,2,3", help="num_stages values the sweep tries")
    p.add_argument("--sweep-cold", action="store_true", help="chains of launches over operand copies")
    p.add_argument("--ncu-probe", action="store_true", help="one values and one keys product, for ncu")
    args = p.parse_args(argv)
    if args.ncu_probe:
        ncu_probe()
        return 0
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = common.out_dir_from(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        sweep_rows = tuple(int(r) for r in args.sweep_rows.split(","))
        stages = tuple(int(s) for s in args.sweep_stages.split(","))
        sweep(args.shapes, device, dtype, out, args.name, sweep_rows, stages, args.sweep_cold)
        return 0
    bw = common.copy_bandwidth(device)
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        n, o, i = (int(s) for s in shape.split("x"))
        w = torch.randn(n, o, i, device=device, dtype=dtype) / i**0.5
        floor = common.floor_ms(w.numel() * w.element_size(), bw)
        for name, (r, fn) in _variants().items():
            x = torch.randn(n, r, i, device=device, dtype=dtype)
            compiled = torch.compile(fn, dynamic=False)
            with torch.no_grad():
                y = compiled(x, w)
                expect = torch.einsum("nri,noi->nro", torch.nn.functional.rms_norm(x, (i,)), w).float()
                err = float((y.float() - expect).norm() / expect.norm())
                call = functools.partial(compiled, x, w)
                clones = _clones_per_call(call)
                run = capture(call, device) if device.type == "cuda" else call
                t = common.time_fn(run, device, warmup=20, samples=200)
            row = dict(shape=shape, variant=name, rows=r, median_us=t.median_ms * 1e3, floor_us=floor * 1e3)
            row.update(
                x_floor=t.median_ms / floor if floor == floor else None, clones_per_call=clones, rel_err=err
            )
            rows.append(row)
            print(
                f"{shape:>15} {name:<10} {row['median_us']:8.2f} us  x floor {row['x_floor'] or float('nan'):.2f}"
                f"  clones/call {clones:.0f}  rel_err {err:.1e}"
            )
    meta: dict[str, Any] = {"env": common.environment(device), "copy_bandwidth_tbs": bw / 1e12}
    meta["command"] = common.command("gemv-lowering", argv)
    title = (
        "## Layer-batched GEMV lowering (compiled + CUDA graph)\n\n"
        f"Device: {common.device_label(meta['env'])}, copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    columns = "shape variant rows median_us:.2f floor_us:.2f x_floor:.2f clones_per_call:.0f rel_err:.1e"
    print(common.write_table(out, args.name, meta, rows, title, columns))
    return 0
