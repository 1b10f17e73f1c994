"""Where a CUDA-graphed decode step's time goes, kernel by kernel, measured inside the graph.

    python -m benchmarks step-timeline                       # on a GPU
    python -m benchmarks step-timeline --shapes 0.5b --variants ops,fused,fused-nopdl
    python -m benchmarks step-timeline --code --shapes 0.5b  # Inductor's code of the step instead

The profiles in ``*_profile.txt`` run the compiled step outside its CUDA graph, so their gaps
between kernels include Python and launch overhead that a graph replay does not have. This script
times the SNLP deferred step (batch 1, context 1024, compiled+graph, the decode benchmark's
Inductor options; its provisional K/V are not written, as in ``decode.py`` and ``Decoder``) by
CUDA events, then profiles graph replays (CUPTI records the kernels a graph launches) and reports
per replay: the span from the first kernel's start to the last one's end, the kernels' summed
time, the gaps between them, and each kernel's median duration.

Variants of the rewritten step's attention (``models.kv.layer_cached_attention``):
  ops            the ops, cache products on the layer-batched GEMV kernel (the default)
  plain          the default build's step without deferred K/V (it writes its K/V after the step)
  seq            the model as written, compiled+graph (the sequential baseline without autotuning;
                 ``--ks`` does not apply)
  fused          the fused decode-attention kernel (``LoweringOptions(decode_attention_in_layers=True)``,
                 ``SNLP_DECODE_ATTENTION=all``), autotuned, PDL
  fused-nopdl    the fused kernel, and every kernel of the step, launched without PDL
                 (``LoweringOptions(pdl=False)``; before the options were per transform only the
                 fused kernel's launch dropped PDL)
Random weights (speed does not depend on weight values). ``--code`` writes Inductor's generated
code of the deferred step instead (``step_code_<shape>_k<K>.py``: which kernels it launches and
what each fuses) and prints its launches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import snlp_compile
from snlp_compile import LoweringOptions
from snlp_compile.models.kv import CachedStep
from snlp_compile.options import ENVIRONMENT

from . import common
from .decode import cache_writer, logits_only, step_inputs


def variant_lowering(spec: str) -> LoweringOptions:
    """The rewritten step's lowering for one variant (see the module docstring): the process's
    defaults with the layers' attention fused or not, PDL on or off."""
    if spec not in ("ops", "plain", "seq", "fused", "fused-nopdl"):
        raise SystemExit(f"unknown variant {spec!r}: ops, plain, seq, fused or fused-nopdl")
    pdl = ENVIRONMENT.pdl and spec != "fused-nopdl"
    return dataclasses.replace(ENVIRONMENT, decode_attention_in_layers=spec.startswith("fused"), pdl=pdl)


def kernel_events(trace_path: Path) -> list[dict[str, Any]]:
    """The GPU kernels (and memsets, copies) of a chrome trace written by torch.profiler, in start order."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    kernels_ = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e]
    return sorted(kernels_, key=lambda e: e["ts"])


def timeline(replay: Any, replays: int) -> dict[str, Any]:
    """Profile ``replays`` graph replays; split the kernels into replays (same count each) and
    summarise span, busy time, gaps and each kernel slot's median duration (microseconds)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = kernel_events(path)
    if not events or len(events) % replays:
        return {"error": f"{len(events)} kernel events for {replays} replays"}
    per = len(events) // replays
    groups = [events[i * per : (i + 1) * per] for i in range(replays)]
    spans = [g[-1]["ts"] + g[-1]["dur"] - g[0]["ts"] for g in groups]
    busy = [sum(e["dur"] for e in g) for g in groups]

    def med(values: Any) -> float:
        return round(statistics.median(values), 2)

    slots = []
    for j in range(per):
        gaps = [g[j]["ts"] - (g[j - 1]["ts"] + g[j - 1]["dur"]) for g in groups] if j else [0.0]
        slot = {"kernel": groups[0][j]["name"][:90], "median_us": med([g[j]["dur"] for g in groups])}
        slots.append({**slot, "gap_before_us": med(gaps)})
    gaps_us = med([s - b for s, b in zip(spans, busy)])
    return {"kernels": per, "span_us": med(spans), "busy_us": med(busy), "gaps_us": gaps_us, "slots": slots}


def step_code(step: CachedStep, inputs: tuple[Any, ...], shape: str, k: int, out: Path) -> None:
    """Inductor's generated code for the compiled SNLP deferred step at K (the benchmarks' options)."""
    from torch._inductor.utils import run_and_get_code

    snlp = snlp_compile.transform(step, inputs, iterations=1, deferred_kv=True)
    options = {
        **common.parse_inductor_options(common.BEST_INDUCTOR),
        **common.parse_inductor_options(common.SNLP_INDUCTOR),
    }
    compiled = torch.compile(common.with_iterations(snlp, k, "h0"), dynamic=False, options=options)
    compiled(*inputs)  # the first call of a sequence (writes nothing); the second is the step
    _, codes = run_and_get_code(compiled, *inputs)
    path = out / f"step_code_{shape}_k{k}.py"
    path.write_text("\n\n# ======== next graph ========\n\n".join(codes))
    pattern = re.compile(r"\.run\(|extern_kernels|torch\.ops\.")
    calls = [line.strip() for code in codes for line in code.splitlines() if pattern.search(line)]
    print(f"{path}: {len(codes)} graph(s), {len(calls)} launches", *calls, sep="\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0.5b,d20")
    p.add_argument("--ks", default="1")
    p.add_argument("--variants", default="ops,fused,fused-nopdl")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--replays", type=int, default=20, help="graph replays profiled per variant")
    p.add_argument("--inductor", default=common.BEST_INDUCTOR, help="Inductor options KEY=VALUE,...")
    p.add_argument("--out", default=None, help=common.OUT_HELP)
    p.add_argument("--name", default="step_timeline")
    p.add_argument("--code", action="store_true", help="write Inductor's code of the step instead")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step-timeline needs a CUDA GPU (it profiles CUDA-graph replays)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    options_all = common.inductor_options(args.inductor)
    snlp_options = common.parse_inductor_options(common.SNLP_INDUCTOR, "--snlp-inductor")
    out = common.out_dir_from(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = common.environment(device)
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with torch.no_grad():
        for shape in args.shapes.split(","):
            model, _ = common.inference_model(
                common.SHAPES[shape], vocab_size=args.vocab, device=device, dtype=dtype
            )
            step = CachedStep(model)
            inputs = step_inputs(model, 1, args.context, args.vocab, device)
            _, pos, k_cache, v_cache = inputs
            if args.code:
                for k in (int(x) for x in args.ks.split(",")):
                    step_code(step, inputs, shape, k, out)
                continue
            ref = step(*inputs)[0]
            for spec in args.variants.split(","):
                for k in (int(x) for x in args.ks.split(",")):
                    torch._dynamo.reset()
                    lowering = variant_lowering(spec)
                    base: Callable[..., Any]
                    if spec == "seq":
                        base, post, options = step, cache_writer(k_cache, v_cache, pos), None
                    else:
                        deferred = spec != "plain"
                        snlp = snlp_compile.transform(
                            step, inputs, iterations=1, deferred_kv=deferred, lowering=lowering
                        )
                        base, options = common.with_iterations(snlp, k, "h0"), snlp_options
                        post = logits_only if deferred else cache_writer(k_cache, v_cache, pos)
                    replay = common.make_variant(
                        base, "compiled+graph", inputs, device, {}, "step", post, options
                    )
                    err = common.rel_err(replay(), ref)
                    t = common.time_fn(replay, device, warmup=20, samples=300)
                    line = timeline(replay, args.replays)
                    row = {"shape": shape, "k": k, "variant": spec, "median_ms": t.median_ms, "rel_err": err}
                    row.update(line)
                    results.append(row)
                    print(
                        f"{shape:>5} K={k} {spec:<18} {t.median_ms:.4f} ms  span {line.get('span_us')} us"
                        f"  busy {line.get('busy_us')} us  gaps {line.get('gaps_us')} us"
                        f"  kernels {line.get('kernels')}  rel_err {err:.1e}"
                    )
            del model, step
            torch.cuda.empty_cache()
    payload = {
        "env": env,
        "command": common.command("step-timeline", argv),
        "inductor": options_all,
        "results": results,
    }
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    header = ["shape", "K", "attention", "replay ms", "span us", "kernels busy us", "gaps us", "kernels"]
    keys = ("shape", "k", "variant", "median_ms", "span_us", "busy_us", "gaps_us", "kernels")
    summary = common.md_table(
        header, [[format(r.get(k), ".4f" if k == "median_ms" else "") for k in keys] for r in results]
    )
    lines = [
        f"# Decode step timeline inside the CUDA graph ({common.device_label(env)}, torch {env['torch']})",
        "",
        "The SNLP deferred step (plain: without deferral; seq: the model as written), batch 1, context",
        f"1024, compiled+graph (Inductor options {options_all}); replay time by CUDA events, the",
        "rest from profiled graph replays (medians). Random weights.",
        "",
        *summary,
    ]
    for r in results:
        slots = [[f"`{s['kernel']}`", s["median_us"], s["gap_before_us"]] for s in r.get("slots", [])]
        lines += ["", f"## {r['shape']} K={r['k']} {r['variant']}", ""]
        lines += common.md_table(["kernel", "us", "gap before us"], slots)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 6 + len(summary)]))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0
