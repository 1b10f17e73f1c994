"""What ``SNLPConfig.verify`` (issue 22) adds to transform(): transform time with and without it,
on a reference model, and whether it accepts the exact rewrites (no false refusal) on this
device and dtype, decode steps with deferred K/V included.

    python benchmarks/verify_cost.py [--model nanochat-small] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch

import snlp_compile
from snlp_compile import SNLPConfig
from snlp_compile.decoding import Decoder
from snlp_compile.models import build_model, config_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nanochat-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shapes", default="2x64,1x256")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(args.model, dtype=dtype).to(args.device).eval()
    n = config_of(model).n_layer
    vocab = config_of(model).vocab_size
    print(f"{args.model} ({n} layers) on {args.device} in {args.dtype}")
    for shape in args.shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        idx = torch.randint(0, vocab, (b, t), device=args.device)
        times: dict[bool, list[float]] = {False: [], True: []}
        for verify in (False, True, False, True):
            t0 = time.perf_counter()
            snlp_compile.transform(model, (idx,), iterations=2, verify=verify)
            times[verify].append(time.perf_counter() - t0)
        with torch.no_grad():
            model(idx)
            t0 = time.perf_counter()
            model(idx)
            if args.device == "cuda":
                torch.cuda.synchronize()
            fwd = time.perf_counter() - t0
        off, on = min(times[False]), min(times[True])
        print(
            f"  example {b}x{t}: transform {off:.2f} s, with verify {on:.2f} s (+{on - off:.2f} s); "
            f"one eager forward {fwd * 1e3:.1f} ms"
        )
    for cfg in (
        SNLPConfig(iterations=n),
        SNLPConfig(iterations=1, init="warm", stages=2),
        SNLPConfig(iterations=2, deferred_kv=True),
    ):
        t0 = time.perf_counter()
        Decoder(model, cfg, batch=1, max_len=64)
        print(
            f"  decode step {cfg.iterations=} {cfg.init=} {cfg.stages=} {cfg.deferred_kv=}: accepted "
            f"({time.perf_counter() - t0:.2f} s)"
        )


if __name__ == "__main__":
    main()
