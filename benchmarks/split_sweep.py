"""The layer-batched GEMV kernel on each product of a batch-1 decode step, its reduction split over
1, 2, 4 or 8 programs per output tile (``layer_gemv.launch(splits=...)``), on a GPU.

    PYTHONPATH=. python benchmarks/split_sweep.py                 # on a GPU
    PYTHONPATH=. python benchmarks/split_sweep.py --shapes 0.5b --splits 1,4

Why: in the in-graph timeline of run 14 the values product (probabilities times the values cache,
read transposed) streamed at 2.8-3.0 TB/s where the keys product reached 3.4-3.8 and the MLP
GEMVs 3.9-4.2: it has only layers x heads x head-dim/BLOCK_O programs (320-400 on the 0.5B and d20
shapes, 2-3 per SM), too few loads in flight. Splitting the context multiplies the programs;
the caller adds the float32 partial sums (fused into the next kernel in a compiled step).

Each product is the PDL op as a step launches it (weights: early tiles; caches: after the wait),
timed as a chain of 24 launches captured in one CUDA graph (CUDA events, median over replays),
cycling over 4 copies of the operands so that no launch finds its operand in L2. "op" times the
op alone (partial sums out); "+sum" adds the partial sums and casts as separate kernels (eager),
an upper bound on what the addition costs in a compiled step, where it fuses into the next
kernel. TB/s: the operand bytes (weights or cache) read per launch over the time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, cuda_graph, device_label, environment, out_dir_from, time_fn, write_table

from snlp_compile.kernels import layer_gemv

# shape -> (layers, width, heads, MLP width); the decode benchmark's trunks at context 1024
STEP_SHAPES = {"0.5b": (32, 640, 10, 2560), "d20": (20, 1280, 10, 5120)}
CHAIN = 24  # launches per graph
COPIES = 4  # operand copies cycled through (together larger than L2)


def products(shape: str, context: int) -> dict[str, tuple[int, int, int, int, bool]]:
    """name -> (N, R, O, I, transposed): a deferred K=1 step's products (q/k/v take two rows)."""
    layers, width, heads, mlp = STEP_SHAPES[shape]
    head_dim = width // heads
    return {
        "values": (layers * heads, 1, head_dim, context, True),
        "keys": (layers * heads, 1, context, head_dim, False),
        "qkv": (layers, 2, 3 * width, width, False),
        "o": (layers, 1, width, width, False),
        "up": (layers, 1, mlp, width, False),
        "down": (layers, 1, width, mlp, False),
    }


def operands(n: int, r: int, o: int, i: int, transposed: bool, device: torch.device) -> tuple:
    """x (N, R, I) and w (N, O, I); a transposed w is a cache (N, I, O) read through its strides."""
    x = torch.randn(n, r, i, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, i, o, device=device, dtype=torch.bfloat16).transpose(1, 2) if transposed else None
    if w is None:
        w = torch.randn(n, o, i, device=device, dtype=torch.bfloat16)
    return x, w


def launches(sets: list[tuple], splits: int, mode: str, pdl: bool, early_weights: bool):
    """A function that launches the product ``CHAIN`` times, cycling over the operand copies;
    ``mode`` "op": the op alone, "+sum": ``layer_gemv.gemv`` (partial sums added and cast)."""

    def chain() -> torch.Tensor:
        for c in range(CHAIN):
            x, w = sets[c % COPIES]
            if mode == "+sum":
                y = layer_gemv.gemv(x, w, pdl, early_weights, splits)
            elif pdl:
                y = torch.ops.snlp.layer_gemv_pdl(x, w, early_weights, splits)
            else:
                y = torch.ops.snlp.layer_gemv(x, w, splits)
        return y

    return chain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b,d20")
    p.add_argument("--products", default="values,keys,qkv,o,up,down")
    p.add_argument("--splits", default="1,2,4,8")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="split_sweep")
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() and layer_gemv.available()):
        raise SystemExit("split_sweep.py needs a CUDA GPU and triton")
    device = torch.device("cuda")
    torch.manual_seed(0)
    out = out_dir_from(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    bandwidth = copy_bandwidth(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    pdl = layer_gemv.pdl_supported(torch.empty(1, device=device))
    rows = []
    t0 = time.perf_counter()
    for shape in args.shapes.split(","):
        for name, (n, r, o, i, transposed) in products(shape, args.context).items():
            if name not in args.products.split(","):
                continue
            sets = [operands(n, r, o, i, transposed, device) for _ in range(COPIES)]
            last = sets[(CHAIN - 1) % COPIES]  # the operands of the launch whose result is checked
            ref = torch.einsum("nri,noi->nro", last[0].float(), last[1].float())
            nbytes = n * o * i * 2
            auto = layer_gemv.split_count(n, o, i, sms)
            for splits in (int(s) for s in args.splits.split(",")):
                for mode in ("op", "+sum"):
                    chain = launches(sets, splits, mode, pdl, early_weights=not transposed)
                    y = chain()  # autotunes outside the capture
                    got = y.sum(0) if (mode == "op" and splits > 1) else y
                    err = ((got.float() - ref).norm() / ref.norm()).item()
                    replay = cuda_graph(chain, device)
                    t = time_fn(replay, device, warmup=10, samples=200)
                    us = t.median_ms * 1e3 / CHAIN
                    row = {
                        "shape": shape,
                        "product": name,
                        "n_r_o_i": f"{n}x{r}x{o}x{i}" + (" T" if transposed else ""),
                        "splits": splits,
                        "auto": "yes" if splits == auto else "",
                        "mode": mode,
                        "us": us,
                        "tbs": nbytes / (us * 1e-6) / 1e12,
                        "x_floor": us / (nbytes / bandwidth * 1e6),
                        "rel_err": err,
                    }
                    rows.append(row)
                    print(
                        f"{shape:>5} {name:<6} S={splits} {mode:<4} {us:7.2f} us {row['tbs']:.2f} TB/s"
                        f" x{row['x_floor']:.2f} floor err {err:.1e} {row['auto']}",
                        flush=True,
                    )
            del sets
            torch.cuda.empty_cache()
    meta = {
        "env": env,
        "copy_bandwidth_tbs": bandwidth / 1e12,
        "sms": sms,
        "pdl": pdl,
        "command": "python benchmarks/split_sweep.py " + " ".join(argv or sys.argv[1:]),
        "seconds": round(time.perf_counter() - t0),
    }
    title = (
        f"## Split reduction sweep ({device_label(env)}, torch {env['torch']}, copy bandwidth"
        f" {bandwidth / 1e12:.2f} TB/s, {sms} SMs)\n\nPer launch, in a chain of {CHAIN} in one CUDA"
        f" graph, operands cycled over {COPIES} copies; bf16; `auto`: `layer_gemv.split_count`'s choice.\n\n"
        f"Command: `{meta['command']}`"
    )
    columns = {
        "shape": "shape:s",
        "product": "product:s",
        "N x R x O x I": "n_r_o_i:s",
        "splits": "splits:d",
        "auto": "auto:s",
        "mode": "mode:s",
        "us": "us:.2f",
        "TB/s": "tbs:.2f",
        "x floor": "x_floor:.2f",
        "rel err": "rel_err:.1e",
    }
    print(write_table(out, args.name, meta, rows, title, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
