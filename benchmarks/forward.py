"""Full-sequence forward benchmark: batch 1, T = 256 and 2048, sequential vs SNLP K = 1, 2, 4, and
staged SNLP (K = 1, S = 2, 4 stages).

    python -m benchmarks forward                       # on a GPU: the full table
    python -m benchmarks forward --device cpu --shapes tiny --seq 32 --modes eager --stage-modes eager

Shapes are layer stacks ("trunks", vocab cut to --vocab so that the embedding and head do not blur
the comparison); bf16, random weights. Variants: sequential and SNLP at each K, in the modes asked
for ("+graph": the compiled callable captured in a CUDA graph after warm-up, which is what
mode="reduce-overhead" does without its tree bookkeeping); staged variants in --stage-modes.
Each case reports the ratio against the best sequential variant of the same run and the bytes
floor; "floor at K" is the larger of that and the FLOP floor (the layers' FLOPs at the measured
matmul rate) times ``common.layer_parallel_passes``, "ceiling vs best seq" the best sequential
time over it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import snlp_compile
from snlp_compile.models import build_model, config_of

from . import common


def smoke(device: torch.device) -> dict[str, Any]:
    """Exact mode on this device: K = L reproduces the sequential model in float32."""
    model = build_model("nanochat-small", device=device, dtype=torch.float32)
    cfg = config_of(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 48), device=device)
    out = snlp_compile.transform(model, (idx,), iterations=cfg.n_layer)
    with torch.no_grad():
        err = common.rel_err(out(idx), model(idx))
    ok = err < 1e-4
    print(f"smoke: nanochat-small fp32 K=L on {device}: rel err {err:.2e} ({'ok' if ok else 'FAILED'})")
    return {
        "model": "nanochat-small",
        "dtype": "float32",
        "K": cfg.n_layer,
        "rel_err": err,
        "ok": ok,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_regime_arguments(
        p,
        name="forward",
        ks_help="SNLP iteration counts",
        profile_help="profile seq and SNLP K=1 compiled per case",
    )
    p.add_argument("--seq", default="256,2048", help="sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-smoke", action="store_true")
    args = p.parse_args(argv)

    run = common.start_regime(
        args, "forward", common.RANDOM_WEIGHTS_NOTE + f"; trunk shapes (vocab {args.vocab})", argv
    )
    device, out, meta = run.device, run.out, run.meta
    if not args.no_smoke:
        meta["smoke"] = smoke(device)
    bench = common.Bench("forward", out, device, meta, name=args.name)
    texts = (args.modes, args.modes if args.seq_modes is None else args.seq_modes, args.stage_modes)
    modes, seq_modes, stage_modes = (common.mode_list(m, device) for m in texts)

    with torch.no_grad():
        for shape in args.shapes.split(","):
            name = common.SHAPES[shape]
            model, model_note = common.inference_model(
                name, vocab_size=args.vocab, device=device, dtype=run.dtype
            )
            cfg = config_of(model)
            wbytes = common.layer_bytes(model)
            t0 = time.perf_counter()
            example = torch.randint(0, args.vocab, (args.batch, 64), device=device)
            snlp = snlp_compile.transform(model, (example,), iterations=1)
            transform_s = time.perf_counter() - t0
            # K=1, init h0, S stages (S = 1 is the plain K=1 variant; more stages than layers are refused)
            staged = {
                c: snlp_compile.transform(model, (example,), iterations=1, stages=c)
                for c in (args.stages if stage_modes else [])
                if 1 < c <= cfg.n_layer
            }
            print(f"{name}: L={cfg.n_layer} d={cfg.n_embd}, layer weights {wbytes / 1e6:.0f} MB")
            shape_label = f"{shape} (L={cfg.n_layer}, d={cfg.n_embd})"
            for T in (int(t) for t in args.seq.split(",")):
                idx = torch.randint(0, args.vocab, (args.batch, T), device=device)
                ref = model(idx)
                case = f"b{args.batch} T={T}"
                flops = 2 * cfg.n_layer * args.batch * T * (12 * cfg.n_embd**2 + T * cfg.n_embd)
                floor = common.floor_ms(wbytes, run.bandwidth)
                rate = meta.get("matmul_tflops")
                # one pass over the layers is bound by FLOPs here (at the measured matmul rate)
                pass_floor = max(floor, flops / (rate * 1e12) * 1e3) if rate else floor
                bench.case_notes[(shape_label, case)] = (
                    f"layer weights {wbytes / 1e6:.0f} MB; {flops / 1e9:.0f} GFLOP per sequential forward"
                    + (f" (FLOP floor {flops / (rate * 1e12) * 1e3:.3f} ms)" if rate else "")
                    + f"; {common.transform_note(snlp, transform_s)}"
                    + (f"; {model_note}" if model_note else "")
                )
                compiled: dict[str, Callable[..., Any]] = {}
                # (family, K, mode, stages)
                plan: list[tuple[str, int | None, str, int]] = [("sequential", None, m, 1) for m in seq_modes]
                plan += [("snlp", k, m, 1) for k in args.ks for m in modes]
                plan += [("snlp-staged", 1, m, c) for c in staged for m in stage_modes]
                for family, k, mode, stages in plan:
                    if family == "sequential":
                        variant, base = f"seq {mode}", model
                    elif family == "snlp-staged":
                        variant, base = f"snlp K={k} S={stages} {mode}", staged[stages]
                    else:
                        assert k is not None  # (every plain SNLP variant has its K)
                        variant, base = f"snlp K={k} {mode}", common.with_iterations(snlp, k)
                    rec = common.Record("forward", shape_label, case, variant, family, k, mode)
                    if family == "snlp-staged":
                        rec.extra["stages"] = stages
                    bench.run(run, rec, base, (idx,), ref, compiled, warmup=5)
                bench.finish_case(shape_label, case, floor, layers=cfg.n_layer, pass_floor=pass_floor)
                if args.profile and device.type == "cuda":
                    for key in ("seq compiled", "snlp K=1 compiled", "snlp K=1 autotuned"):
                        if key in compiled:
                            label = f"{shape_label} {case} {key}"
                            common.profile_variant(
                                partial(compiled[key], idx), label, out / f"{args.name}_profile.txt"
                            )
            del model, snlp, staged
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return bench.done(run.t_start)
