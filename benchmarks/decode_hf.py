"""KV-cached decode of `transformers` models (issue 24 item 3): the HF model's own modules through
the decode adapter (snlp_compile.models.hf_decode), sequential step vs the SNLP K=1 and K=2 steps.

    python -m benchmarks decode-hf --out DIR                           # on a GPU: both shapes
    python -m benchmarks decode-hf --shapes llama-3.2-1b --out DIR
    python -m benchmarks decode-hf --smoke --device cpu --out DIR      # tiny configs, on the CPU

The model is built by `transformers` from a config with the real shapes (Qwen2.5-0.5B,
Llama-3.2-1B; random weights, seeded; bf16; nothing downloaded), batch 1, one new token over
``--context`` positions. Every variant runs what ``decode.py`` runs for the reference models (its
``step_inputs``: context-1 random cached keys/values; the step plus the cache write timed), with the
adapter's cached step (``CachedStep(HFCachedLM(model))``) as the sequential step and its
``transform()`` for SNLP (also with ``deferred_kv``, as in ``decode.py``), timed and reported by ``common`` (best sequential over eager, compiled
and CUDA-graph variants; ratios against it). The model's own forward over a `transformers`
StaticCache holding the same keys/values ("hf StaticCache", the route its docs give for compiled
decoding) is a sequential baseline too; its rel_err against the adapter's step checks the adapter.

Vocabulary cut as in ``decode.py``: the model is built with ``--vocab`` tokens (default 256, not
the real 151936 / 128256), so the head and embedding are negligible in every variant, and the
bytes floor counts the layer weights plus the KV cache read once, over the measured copy
bandwidth (Qwen2.5-0.5B's real head alone is 272 MB in bf16, more than its 24 layers' 715 MB
would let a decode step ignore). ``--vocab 0`` builds the real vocabulary; the floor then adds the
head's bytes.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch

from snlp_compile.models.hf_decode import HFCachedLM
from snlp_compile.models.kv import CachedStep

from . import common
from .decode import cache_writer, step_inputs, step_variant, transform_step

if TYPE_CHECKING:
    from transformers.cache_utils import StaticLayer

# --shapes key -> (model class, config class, config fields): the published configs' shapes
HF_SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2.5-0.5b": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(
            hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "llama-3.2-1b": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
            rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            },
        ),
    ),
    # --smoke: the same two families, tiny
    "tiny-qwen2": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=128, max_position_embeddings=256),
    ),
    "tiny-llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True),
    ),
}  # fmt: skip
SMOKE = [
    "--shapes", "tiny-qwen2,tiny-llama", "--context", "32", "--dtype", "fp32", "--modes", "eager,compiled",
    "--ks", "1,2", "--warm-ks", "", "--deferred-ks", "", "--vocab", "64", "--hf-modes", "eager",
    "--budget-s", "300",
]  # fmt: skip


def build_hf(shape: str, vocab: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, int]:
    """The `transformers` model of a shape with random weights (seeded), and its real vocabulary."""
    import transformers

    model_cls, config_cls, fields = HF_SHAPES[shape]
    real_vocab = int(fields["vocab_size"])
    fields = dict(fields, vocab_size=vocab or real_vocab)
    config = getattr(transformers, config_cls)(
        **fields, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, model_cls)(config)
    return model.to(dtype=dtype).eval(), real_vocab


def hf_static_step(
    hf: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """The model's own forward over a `transformers` StaticCache that holds the same cached
    keys/values as ``inputs``' caches: what a `transformers` user compiles for decoding (the
    StaticCache route of its docs). Same call signature as the cached step, returns the logits;
    the cache write is HF's own, inside the step. A sequential baseline like the adapter's."""
    import transformers

    _, pos, k_cache, v_cache = inputs
    n = int(pos)
    config = hf.config
    assert isinstance(config, transformers.PreTrainedConfig)  # (a transformers model's)
    cache = transformers.StaticCache(config=config, max_cache_len=k_cache.shape[3])
    position = pos.reshape(1)
    lengths: list[torch.Tensor] = []  # (transformers >= 5.2x: layers count their own length)
    # (transformers 5.25 renamed past_key_values to cache and warns on the old name)
    cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def step(
        idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        for length in lengths:  # every call decodes position n again: rewind the counted length
            length.fill_(n)
        out = hf(
            input_ids=idx,
            **{cache_arg: cache},
            cache_position=position,
            position_ids=position.expand(idx.shape[0], 1),
            use_cache=True,
        )
        return out.logits

    step(*inputs)  # (allocates the cache's layers)
    # (a StaticCache of these full-attention models holds StaticLayers)
    for i, layer in enumerate(cast("list[StaticLayer]", cache.layers)):
        assert layer.keys is not None and layer.values is not None  # (allocated by the call above)
        layer.keys[:, :, :n].copy_(k_cache[i, :, :, :n])
        layer.values[:, :, :n].copy_(v_cache[i, :, :, :n])
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            lengths.append(layer.cumulative_length)
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_regime_arguments(
        p, name="decode_hf", ks_help="SNLP iteration counts (init h0)", profile_help="profile seq and K=1"
    )
    p.set_defaults(shapes="qwen2.5-0.5b,llama-3.2-1b", ks=[1, 2], modes="eager,compiled,compiled+graph")
    p.add_argument(
        "--seq-extra-modes", default="eager+graph", help="modes only the sequential step also runs"
    )
    p.add_argument(
        "--hf-modes",
        default="eager,compiled,compiled+graph",
        help="modes of the model's own forward over a transformers StaticCache (a sequential baseline too)",
    )
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warm-ks", default="1,2", type=common.int_list, help="SNLP Ks also run with init warm")
    p.add_argument("--warm-modes", default="compiled+graph")
    p.add_argument(
        "--deferred-ks",
        default="1,2",
        type=common.int_list,
        help="Ks also timed with deferred K/V (decode.py)",
    )
    p.add_argument("--deferred-modes", default="compiled+graph")
    smoke = "tiny configs on the CPU: " + " ".join(SMOKE) + common.SMOKE_OUT_HELP
    p.add_argument("--smoke", action="store_true", help=smoke)
    raw = list(argv) if argv is not None else None
    args = p.parse_args(argv)
    if args.smoke:  # (arguments given explicitly still win)
        args = p.parse_args([*SMOKE, "--device", "cpu", *(raw or [])])
    unknown = [s for s in args.shapes.split(",") if s not in HF_SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(HF_SHAPES)}")

    vocab_note = (
        "real vocabulary; floor includes the head" if args.vocab == 0 else f"vocab cut to {args.vocab}"
    )
    run = common.start_regime(
        args,
        "decode-hf",
        common.RANDOM_WEIGHTS_NOTE + f"; transformers models with real layer shapes, {vocab_note} as in "
        "decode.py (floor = layer weights + KV cache); step + cache write timed",
        argv,
        smoke=args.smoke,
    )
    device, out, ctx, batch = run.device, run.out, args.context, args.batch
    bench = common.Bench("decode-hf", out, device, run.meta, name=args.name)
    seq_modes = common.mode_list(args.modes if args.seq_modes is None else args.seq_modes, device)
    seq_modes += [m for m in common.mode_list(args.seq_extra_modes, device) if m not in seq_modes]
    modes, warm_modes = common.mode_list(args.modes, device), common.mode_list(args.warm_modes, device)
    hf_modes = common.mode_list(args.hf_modes, device)
    deferred_modes = common.mode_list(args.deferred_modes, device)

    with torch.no_grad():
        for shape in args.shapes.split(","):
            hf, real_vocab = build_hf(shape, args.vocab, device, run.dtype)
            model = HFCachedLM(hf, max_len=ctx)
            cfg = model.config
            step = CachedStep(model)
            wbytes = common.layer_bytes(model, "blocks")
            head = model.get_parameter("lm_head.weight")
            head_bytes = head.numel() * head.element_size() if args.vocab == 0 else 0
            label = f"{shape} (L={cfg.n_layer}, d={cfg.n_embd}, kv heads {cfg.n_kv_head})"
            inputs = step_inputs(model, batch, ctx, cfg.vocab_size, device)
            _, pos, k_cache, v_cache = inputs
            kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
            steps = transform_step(step, inputs, deferred=bool(args.deferred_ks and deferred_modes))
            case = f"b{batch} ctx={ctx}"
            cut = (
                f"real vocabulary {real_vocab}, head {head_bytes / 1e6:.0f} MB in the floor"
                if args.vocab == 0
                else f"vocabulary cut to {cfg.vocab_size} as in decode.py (real {real_vocab}: head not in the floor)"
            )
            bench.case_notes[(label, case)] = (
                f"floor = layer weights {wbytes / 1e6:.0f} MB + KV cache {kv_bytes / 1e6:.0f} MB read once; "
                f"{cut}; transformers {type(hf).__name__} through the decode adapter; "
                + common.transform_note(steps.snlp, steps.transform_s)
            )
            plan: list[tuple[str, str, int | None, str]] = [("sequential", "", None, m) for m in seq_modes]
            plan += [("sequential", "hf", None, m) for m in hf_modes]
            plan += [("snlp", "h0", k, m) for k in args.ks for m in modes]
            plan += [("snlp", "warm", k, m) for k in args.warm_ks for m in warm_modes]
            plan += [("snlp-deferred", "h0", k, m) for k in args.deferred_ks for m in deferred_modes]
            # K=1 rows first, autotuned ones last: what a spent --budget-s skips matters least
            plan.sort(key=lambda row: (row[3].startswith("autotuned"), row[2] or 1))
            compiled: dict[str, Callable[..., Any]] = {}
            post = cache_writer(k_cache, v_cache, pos)
            hf_step = hf_static_step(hf, inputs) if hf_modes else None
            for family, init, k, mode in plan:
                if init == "hf":  # the model's own forward: it writes its StaticCache itself
                    assert hf_step is not None  # (hf rows are planned for hf_modes only)
                    rec = common.Record("decode-hf", label, case, f"hf StaticCache {mode}", family, k, mode)
                    rec.extra["init"] = None
                    bench.run(
                        run, rec, hf_step, inputs, reference=steps.reference, compiled=compiled, warmup=10
                    )
                    continue
                variant, base, write = step_variant(family, init, k, mode, step, steps, post)
                rec = common.Record("decode-hf", label, case, variant, family, k, mode)
                rec.extra["init"] = init or None
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
            floor = common.floor_ms(wbytes + kv_bytes + head_bytes, run.bandwidth)
            bench.finish_case(label, case, floor, layers=cfg.n_layer)
            if args.profile and device.type == "cuda":
                for key in ("seq compiled", "snlp K=1 compiled"):
                    if key in compiled:
                        fn = partial(compiled[key], *inputs)
                        common.profile_variant(fn, f"{label} {case} {key}", out / f"{args.name}_profile.txt")
            del steps, compiled, step, model, hf, hf_step
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return bench.done(run.t_start)
