"""Layer-parallel decoding across the GPUs of one host (issue 26): decode-step latency at G ranks.

    torchrun --nproc-per-node 4 -m benchmarks.multigpu              # G = 4; run again with 1 and 2
    torchrun --nproc-per-node 2 -m benchmarks.multigpu --smoke --device cpu   # tiny, gloo, CPU

One launch measures G = the world size. Every rank builds the model (same seed), then, on rank 0
alone while the others wait (single-device baselines, the same run): the sequential step and the
compiler's exact sequential lowering (``stages`` = L at K = 1), the best of them is the
"best sequential step", and the single-device K = 1 step. Then all ranks together: the
layer-parallel step across the G ranks (``Decoder(..., process_group=)``, K = 1 and 2) and a
tensor-parallel sequential baseline (``torch.distributed.tensor.parallel``: q/k/v and the MLP's
first linear column-wise, both output projections row-wise, heads and KV caches sharded; two
all-reduces per layer). Batch 1, context 1024, bf16, random weights; one decode step plus its
cache write is timed (rank 0's clock, after a barrier).

Shapes: "d20" (the nanochat d20 trunk, L=20, d=1280) and "8b", an 8B-class trunk: L=32, d=4096,
32 heads, 8 KV heads. The reference models have no MLP-width option: their MLP is 4d = 16384
wide with two matrices (relu^2), 134M parameters per layer against Llama-3-8B's 176M (three
matrices of 14336); attention is the same. Modes (every variant): "eager", "eager+graph" (a CUDA
graph, the collectives inside it) and "compiled+graph" (torch.compile, breaking the graph at the
collectives of the layer-parallel step).
Writes ``multigpu_G{G}.json`` and ``.md`` to ``--out``, else $OUT, else benchmarks/results/multigpu
(--smoke without either: to a new temporary folder, named in the output, so that the check leaves the checkout as
it was).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks import common
from snlp_compile import Decoder, SNLPConfig, transform
from snlp_compile.config import stage_sizes
from snlp_compile.cuda_graph import capture
from snlp_compile.models.kv import CachedStep, new_cache, write_cache
from snlp_compile.models.nanochat import CausalSelfAttention
from snlp_compile.models.registry import build_model, config_of
from snlp_compile.solve.handle import solve_handle

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "d20": ("nanochat-d20", {}),
    "8b": ("nanochat-d20", {"n_layer": 32, "n_embd": 4096, "n_head": 32, "n_kv_head": 8}),
    "tiny": ("nanochat-tiny", {}),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="d20,8b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--vocab", type=int, default=256, help="vocabulary of the trunk (head cost)")
    p.add_argument("--ks", default="1,2", type=common.int_list, help="layer-parallel iteration counts")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument(
        "--modes", default=None, help="eager, compiled, +graph (default: all three on CUDA, eager on CPU)"
    )
    where = "output folder (default: $OUT, else benchmarks/results/multigpu; --smoke: a new temporary folder)"
    p.add_argument("--out", type=Path, default=None, help=where)
    p.add_argument("--smoke", action="store_true", help="tiny shape, context 32, fp32, few samples")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.context, args.dtype, args.samples, args.ks = "tiny", 32, "fp32", 5, [1]
    return args


def _modes(args: argparse.Namespace, device: torch.device) -> list[str]:
    if args.modes:
        return args.modes.split(",")
    return ["eager", "eager+graph", "compiled+graph"] if device.type == "cuda" else ["eager"]


def _callable(step: Callable[..., Any], mode: str, device: torch.device) -> Callable[[], Any]:
    """``step()`` in a mode: compiled (static shapes) and/or replayed from a CUDA graph."""
    fn = common.compile_module(step) if mode.startswith("compiled") else step
    return capture(fn, device) if mode.endswith("+graph") else fn


def _step_call(step: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    """One decode step of ``step`` plus its cache write; returns the logits."""
    idx, pos, k_cache, v_cache = inputs

    def call() -> torch.Tensor:
        logits, new_k, new_v = step(idx, pos, k_cache, v_cache)
        write_cache(k_cache, v_cache, new_k, new_v, pos)
        return logits

    return call


def _inputs(
    model: nn.Module, ctx: int, device: torch.device, shard: tuple[int, int] = (0, 1)
) -> tuple[torch.Tensor, ...]:
    """(idx, pos, k_cache, v_cache) of a step at position ctx - 1 over a random cache; ``shard`` =
    (rank, G): the rank's KV heads only (a tensor-parallel rank)."""
    k, v = new_cache(model, 1, ctx, device=device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    k.copy_(torch.randn(k.shape, generator=gen))
    v.copy_(torch.randn(v.shape, generator=gen))
    rank, world = shard
    if world > 1:
        heads = k.shape[2] // world
        k, v = (c[:, :, rank * heads : (rank + 1) * heads].contiguous() for c in (k, v))
    idx = torch.ones(1, 1, dtype=torch.long, device=device)
    return idx, torch.tensor(ctx - 1, device=device), k, v


def _tensor_parallel(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """A copy of the nanochat-style model sharded over the ranks by heads and MLP columns."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = copy.deepcopy(model)
    if world == 1:
        return tp
    mesh = init_device_mesh(device.type, (world,))
    plan = {
        "attn.c_q": ColwiseParallel(),
        "attn.c_k": ColwiseParallel(),
        "attn.c_v": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(),
    }
    for block in cast(nn.ModuleList, tp.get_submodule("transformer.h")):
        parallelize_module(block, mesh, plan)
        attn = block.get_submodule("attn")
        assert isinstance(attn, CausalSelfAttention)  # (SHAPES are nanochat models)
        attn.n_head //= world
        attn.n_kv_head //= world
    return tp


class Runner:
    """Times variants on rank 0 (all ranks call them in lockstep) and collects the rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device, world: int):
        self.args, self.device, self.world = args, device, world
        self.rank = dist.get_rank()
        self.rows: list[dict[str, Any]] = []

    def time(
        self, shape: str, variant: str, mode: str, fn: Callable[[], Any], ref: torch.Tensor | None, ranks: int
    ) -> None:
        """Time ``fn`` (on ``ranks`` = 1 device, rank 0 alone, or all G together)."""
        row: dict[str, Any] = {"shape": shape, "variant": variant, "mode": mode, "G": ranks}
        try:
            out = fn()  # (every rank: a collective step is called by all ranks in lockstep)
            err = None if ref is None else (out.float() - ref.float()).abs().max().item()
            if ranks > 1:
                dist.barrier()
            t = common.time_fn(fn, self.device, warmup=5, samples=self.args.samples)
            row.update(median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, max_abs_err=err, error=None)
        except Exception as e:  # (a variant that fails is a row saying why, not a lost run)
            row.update(median_ms=None, error=f"{type(e).__name__}: {e}".splitlines()[0])
        self.rows.append(row)
        if self.rank == 0:
            print(json.dumps(row), flush=True)


def _single_device(run: Runner, label: str, model: nn.Module, ctx: int) -> dict[str, torch.Tensor]:
    """Rank 0 alone: the sequential step, the exact sequential lowering, the K=1 step."""
    device = run.device
    step = CachedStep(model)
    inputs = _inputs(model, ctx, device)
    ref = step(*inputs)[0]
    layers = config_of(model).n_layer
    lowering = transform(step, inputs, iterations=1, stages=layers)
    k1 = transform(step, inputs, iterations=1)
    for name, base in (("sequential", step), ("sequential lowering", lowering), ("K=1 single device", k1)):
        for mode in _modes(run.args, device):
            fn = _callable(_step_call(base, _inputs(model, ctx, device)), mode, device)
            run.time(label, name, mode, fn, ref, 1)
    return {"ref": ref, "k1": k1(*_inputs(model, ctx, device))[0]}


def _distributed(run: Runner, label: str, model: nn.Module, ctx: int, refs: dict[str, torch.Tensor]) -> None:
    """All ranks: the layer-parallel step at each K, and the tensor-parallel sequential step."""
    device, world = run.device, run.world
    dec = Decoder(model, SNLPConfig(iterations=1), batch=1, max_len=ctx, process_group=dist.group.WORLD)
    handle = solve_handle(dec.decode_step)
    _, pos, k, v = _inputs(model, ctx, device)
    start, block = sum(stage_sizes(config_of(model).n_layer, world)[: run.rank]), dec.k_cache.shape[0]
    dec.k_cache.copy_(k[start : start + block])  # (the same random cache as the single-device steps)
    dec.v_cache.copy_(v[start : start + block])
    token = torch.ones(1, dtype=torch.long, device=device)
    for kk in run.args.ks:
        handle.iterations = kk
        ref = refs.get("k1") if kk == 1 else None
        for mode in _modes(run.args, device):
            fn = _callable(lambda: dec.step(token, pos), mode, device)
            run.time(label, f"layer-parallel K={kk}", mode, fn, ref, world)
    tp = _tensor_parallel(model, world, device)
    tp_inputs = _inputs(model, ctx, device, shard=(run.rank, world))
    for mode in _modes(run.args, device):
        fn = _callable(_step_call(CachedStep(tp), tp_inputs), mode, device)
        run.time(label, "tensor-parallel sequential", mode, fn, refs.get("ref"), world)


def _ratio(ms: float | None, base: float | None) -> str:
    return f"{ms / base:.2f}x" if ms and base else "-"


def _table(rows: list[dict[str, Any]], world: int, meta: dict[str, Any]) -> str:
    lines = [
        f"# Layer-parallel decoding, G = {world} ({meta['device']}, {meta['dtype']}, batch 1, context {meta['context']})",
        "",
        "| shape | variant | mode | G | median ms | vs single-device K=1 | vs best sequential | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape and r["median_ms"]]
        k1 = min((r["median_ms"] for r in mine if r["variant"] == "K=1 single device"), default=None)
        seq = min((r["median_ms"] for r in mine if r["variant"].startswith("sequential")), default=None)
        for r in (r for r in rows if r["shape"] == shape):
            ms = r["median_ms"]
            cell = f"{ms:.3f}" if ms else "-"
            lines.append(
                f"| {shape} | {r['variant']} | {r['mode']} | {r['G']} | {cell} | {_ratio(ms, k1)} | {_ratio(ms, seq)} "
                f"| {r.get('error') or ''} |"
            )
    return "\n".join(lines) + "\n"


def out_dir(args: argparse.Namespace) -> Path:
    """The other benchmarks' rule (``common.out_dir_from``: --out, else $OUT, the device machine's
    return folder, else a smoke run's new temporary folder), with benchmarks/results/multigpu as
    the tracked default (rank 0 alone writes: only it calls this)."""
    path = common.out_dir_from(args.out, smoke=args.smoke)
    return path / "multigpu" if path == common.RESULTS_DIR else path


def require_cuda() -> None:
    """Without a CUDA GPU, --device cuda stops before the process group, in one line from rank 0."""
    if torch.cuda.is_available():
        return
    if os.environ.get("RANK", "0") != "0":
        raise SystemExit(2)
    raise SystemExit(
        f"python -m benchmarks.multigpu: needs a CUDA GPU and torch {torch.__version__} sees none; "
        "--smoke --device cpu runs it on a CPU"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.device == "cuda":
        require_cuda()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = Runner(args, device, world)
    t0 = time.time()
    try:
        with torch.no_grad():
            for shape in args.shapes.split(","):
                name, overrides = SHAPES[shape]
                model = build_model(
                    name, device=device, dtype=common.DTYPES[args.dtype], vocab_size=args.vocab, **overrides
                )
                cfg = config_of(model)
                label = f"{shape} (L={cfg.n_layer}, d={cfg.n_embd})"
                refs: dict[str, torch.Tensor] = {}
                if rank == 0:
                    refs = _single_device(run, label, model, args.context)
                dist.barrier()
                _distributed(run, label, model, args.context, refs)
                del model
        if rank == 0:
            meta = {
                "device": common.device_label(common.environment(device)),
                "dtype": args.dtype,
                "context": args.context,
                "world": world,
                "seconds": round(time.time() - t0, 1),
                "env": common.environment(device),
            }
            out = out_dir(args)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"multigpu_G{world}.json").write_text(
                json.dumps({"meta": meta, "rows": run.rows}, indent=1)
            )
            (out / f"multigpu_G{world}.md").write_text(_table(run.rows, world, meta))
            print(f"wrote {out}/multigpu_G{world}.json and .md")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
