"""KV-cached decode benchmark: one token per step at context 1024, batch 1 and 8, sequential vs
SNLP K = 1, 2, 4 (init h0, and warm for the first Ks), and staged SNLP (K = 1, S = 2, 4 stages).

    python -m benchmarks decode                        # on a GPU: the full table
    python -m benchmarks decode --device cpu --shapes tiny --context 32 --modes eager --stage-modes eager

Every variant runs the same thing: the model's cached step (models.kv: explicit stacked caches,
a position input, the new K/V returned) followed by the cache write (index_copy_ at pos), with the
transformed step in place of the original for SNLP. The cache holds context-1 random keys/values
and the step decodes position context-1, so attention reads `context` positions. Shapes are
layer stacks ("trunks", vocab cut to --vocab); bf16; random weights.

Families: "snlp K=k S=s" (SNLPConfig.stages: s consecutive stages solved one after another, each
layer-parallel; s = layers at K = 1 is the compiler's exact sequential mode, counted as a
sequential baseline); "snlp K=k einsum" (graph modes only: a transform with
``LoweringOptions(gemv_kernel=False)``, cuBLAS' batched GEMM); "snlp K=k deferred"
(SNLPConfig(deferred_kv=True): the previous token's corrected K/V are a second row of this step's
q/k/v GEMVs, written by the step into the cache; the provisional K/V the step returns are not
written, as in ``Decoder``, so the step is timed alone).

Bytes floor: the layer weights plus the KV cache read once, over the measured copy bandwidth.
"floor at K": the floor times ``common.layer_parallel_passes`` (K iterations re-read the weights
and caches of every layer whose input is not yet exact); "ceiling vs best seq": the best
sequential time over it, the highest ratio any step can reach.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

import snlp_compile
from snlp_compile.models import config_of
from snlp_compile.models.kv import CachedStep, new_cache, write_cache

from . import common


def cache_writer(
    k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor
) -> Callable[[Any], torch.Tensor]:
    def write(out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits, new_k, new_v = out
        write_cache(k_cache, v_cache, new_k, new_v, pos)
        return logits

    return write


def step_inputs(
    model: torch.nn.Module, batch: int, ctx: int, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, pos, k_cache, v_cache) of a step decoding position ctx-1 over ctx-1 random cached
    keys/values, so that its attention reads ``ctx`` positions."""
    k_cache, v_cache = new_cache(model, batch, ctx)
    k_cache[:, :, :, : ctx - 1].normal_()
    v_cache[:, :, :, : ctx - 1].normal_()
    pos = torch.tensor(ctx - 1, device=device)
    idx = torch.randint(0, vocab, (batch, 1), device=device)
    return idx, pos, k_cache, v_cache


def logits_only(out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A deferred step's post: its K/V are provisional and not written (``Decoder`` skips them:
    the next step writes the corrected ones into that slot before reading it)."""
    return out[0]


@dataclass
class StepTransforms:
    """A decode step's reference logits and its SNLP transforms (K = 1, init h0; ``with_iterations``
    makes the other rows), with how long the plain transform took (a case note)."""

    reference: torch.Tensor
    snlp: torch.fx.GraphModule
    deferred: torch.fx.GraphModule | None
    transform_s: float


def transform_step(step: CachedStep, inputs: tuple[torch.Tensor, ...], *, deferred: bool) -> StepTransforms:
    """The transforms every decode regime times: the plain one (timed) and, when ``deferred``, the
    one with deferred K/V."""
    reference = step(*inputs)[0]
    t0 = time.perf_counter()
    snlp = snlp_compile.transform(step, inputs, iterations=1)
    transform_s = time.perf_counter() - t0
    deferred_step = snlp_compile.transform(step, inputs, iterations=1, deferred_kv=True) if deferred else None
    return StepTransforms(reference, snlp, deferred_step, transform_s)


def step_variant(
    family: str,
    init: str,
    k: int | None,
    mode: str,
    step: CachedStep,
    steps: StepTransforms,
    post: Callable[[Any], torch.Tensor],
) -> tuple[str, Callable[..., Any], Callable[[Any], torch.Tensor]]:
    """(row label, module, post) of a sequential, deferred or plain SNLP row (init h0 or warm): a
    deferred step writes its K/V itself (``logits_only``), the others through ``post``."""
    if family == "sequential":
        return f"seq {mode}", step, post
    assert k is not None
    if family == "snlp-deferred":
        assert steps.deferred is not None
        return f"snlp K={k} deferred {mode}", common.with_iterations(steps.deferred, k, "h0"), logits_only
    tag = "" if init == "h0" else " warm"
    return f"snlp K={k}{tag} {mode}", common.with_iterations(steps.snlp, k, init), post


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_regime_arguments(
        p,
        name="decode",
        ks_help="SNLP iteration counts (init h0)",
        profile_help="profile seq and SNLP K=1 compiled at batch 1",
    )
    p.add_argument("--batch", default="1,8")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument(
        "--warm-ks", default="1,2", type=common.int_list, help="SNLP iteration counts with init warm"
    )
    p.add_argument("--warm-modes", default="compiled+graph")
    p.add_argument(
        "--deferred-ks", default="1,2", type=common.int_list, help="Ks also timed with deferred K/V"
    )
    p.add_argument("--deferred-modes", default="compiled,compiled+graph")
    p.add_argument(
        "--einsum-ks", default="1", type=common.int_list, help="Ks also timed without the GEMV kernel"
    )
    args = p.parse_args(argv)

    run = common.start_regime(
        args,
        "decode",
        common.RANDOM_WEIGHTS_NOTE + f"; trunk shapes (vocab {args.vocab}); step + cache write timed"
        " (deferred steps: the step alone, which writes the previous token's K/V)",
        argv,
    )
    device, out = run.device, run.out
    bench = common.Bench("decode", out, device, run.meta, name=args.name)
    seq = args.modes if args.seq_modes is None else args.seq_modes
    texts = (args.modes, seq, args.warm_modes, args.stage_modes, args.deferred_modes)
    modes, seq_modes, warm_modes, stage_modes, deferred_modes = (common.mode_list(m, device) for m in texts)
    ctx = args.context

    with torch.no_grad():
        for shape in args.shapes.split(","):
            model, model_note = common.inference_model(
                common.SHAPES[shape], vocab_size=args.vocab, device=device, dtype=run.dtype
            )
            cfg = config_of(model)
            wbytes = common.layer_bytes(model)
            shape_label = f"{shape} (L={cfg.n_layer}, d={cfg.n_embd})"
            step = CachedStep(model)
            for batch in (int(b) for b in args.batch.split(",")):
                inputs = step_inputs(model, batch, ctx, args.vocab, device)
                _, pos, k_cache, v_cache = inputs
                steps = transform_step(step, inputs, deferred=bool(args.deferred_ks and deferred_modes))
                # the same step lowered without the GEMV kernel (cuBLAS' batched GEMM): its A/B
                einsum = (
                    snlp_compile.transform(
                        step, inputs, iterations=1, lowering=snlp_compile.LoweringOptions(gemv_kernel=False)
                    )
                    if args.einsum_ks and any(m.endswith("+graph") for m in modes)
                    else None
                )
                # K=1, init h0, S stages (S = 1 is the plain K=1 variant; more stages than layers are refused)
                staged = {
                    c: snlp_compile.transform(step, inputs, iterations=1, stages=c)
                    for c in (args.stages if stage_modes else [])
                    if 1 < c <= cfg.n_layer
                }
                kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
                case = f"b{batch} ctx={ctx}"
                bench.case_notes[(shape_label, case)] = (
                    f"floor = layer weights {wbytes / 1e6:.0f} MB + KV cache {kv_bytes / 1e6:.0f} MB read once; "
                    + common.transform_note(steps.snlp, steps.transform_s)
                    + (f"; {model_note}" if model_note else "")
                )
                compiled: dict[str, Callable[..., Any]] = {}
                # (family, init, K, mode, stages)
                plan: list[tuple[str, str, int | None, str, int]] = [
                    ("sequential", "", None, m, 1) for m in seq_modes
                ]
                plan += [("snlp", "h0", k, m, 1) for k in args.ks for m in modes]
                plan += [("snlp", "warm", k, m, 1) for k in args.warm_ks for m in warm_modes]
                plan += [("snlp-staged", "h0", 1, m, c) for c in staged for m in stage_modes]
                plan += [("snlp-deferred", "h0", k, m, 1) for k in args.deferred_ks for m in deferred_modes]
                plan += [
                    ("snlp-einsum", "h0", k, m, 1)
                    for k in args.einsum_ks
                    for m in modes
                    if m.endswith("+graph")
                ]
                post = cache_writer(k_cache, v_cache, pos)
                base: Callable[..., Any]
                for family, init, k, mode, stages in plan:
                    if family == "snlp-staged":
                        variant, base, write = f"snlp K={k} S={stages} {mode}", staged[stages], post
                    elif family == "snlp-einsum":
                        assert einsum is not None and k is not None
                        variant, write = f"snlp K={k} einsum {mode}", post
                        base = common.with_iterations(einsum, k, "h0")
                    else:
                        variant, base, write = step_variant(family, init, k, mode, step, steps, post)
                    rec = common.Record("decode", shape_label, case, variant, family, k, mode)
                    rec.extra["init"] = init or None
                    if family == "snlp-staged":
                        rec.extra["stages"] = stages
                    bench.run(
                        run,
                        rec,
                        base,
                        inputs,
                        reference=steps.reference,
                        compiled=compiled,
                        post=write,
                        warmup=10,
                    )
                floor = common.floor_ms(wbytes + kv_bytes, run.bandwidth)
                bench.finish_case(shape_label, case, floor, layers=cfg.n_layer)
                if args.profile and device.type == "cuda" and batch == 1:
                    for key in ("seq compiled", "snlp K=1 compiled", "snlp K=1 deferred compiled"):
                        if key in compiled:
                            fn = partial(compiled[key], *inputs)
                            label = f"{shape_label} {case} {key}"
                            common.profile_variant(fn, label, out / f"{args.name}_profile.txt", rows=40)
                del steps, staged, compiled, einsum
            del model, step
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return bench.done(run.t_start)
