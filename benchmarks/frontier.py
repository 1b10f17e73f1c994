"""Speed at equal quality: train a model family, measure the perplexity of the KV-cached decode step
the users deploy, time that step, and put both on one frontier beside shallower sequential models.

    python -m benchmarks frontier run --work /tmp/frontier --out $OUT     # a GPU, ~40 min (see below)
    python -m benchmarks frontier run --smoke --work /tmp/fs --out /tmp/fs # CPU: checks the script
    python -m benchmarks frontier reference --work /tmp/ref               # a GPU: one checkpoint, ~3 min
    python -m benchmarks frontier assemble --work /tmp/frontier --out DIR # the report of a run cut short
    python -m benchmarks frontier report benchmarks/results/frontier.json # table + plot from the JSON
    python -m benchmarks frontier run --quality-from J --work W --out O --points 16:2:h0:f4  # fused point
    python -m benchmarks frontier assemble --work W --out O --timings-from J  # new quality, old timings
    python -m benchmarks frontier assemble --work W --out O --quality-from J --timings-from J  # + J's other models

Stages, one process (so checkpoints stay on the machine's local disk, ``--work``):
1. data: a byte-level BPE (``--vocab``) trained on a sample of the local Python sources, then the
   train / held-out split tokenised with it (per-token perplexity, as the paper reports);
2. train: the unregularised baseline (two seeds: the noise), the paper-recipe regularised model
   (``RegulariserConfig()`` defaults), SNLP-forward fine-tunes of the baseline (one of them through
   the fused solve: wide layers of M, ``SNLPConfig.fused_layers``) and of partial tails (the last
   P layers at K=2, mostly from ``reg``: ``tail_variants``; at K=1, plain and as wide layers:
   ``k1_tail_variants``), and shallow sequential controls
   (L/2, L/4) on the same data and token budget; each a safetensors checkpoint;
3. quality: teacher-forced perplexity of each model's cached decode step
   (``snlp_compile.train.decode_eval``) over parallel layers x K x init (a tail fine-tune: its own
   P only), plus the paper's fusion
   (wide layers of M = 2 and 4 over all layers, K x h0; every token through the fused solve), in
   bf16 as timed; a point's ``fusion`` is M (1: none);
4. speed: the same steps at batch 1, context ``--context``: the sequential baselines (model as
   written and the compiler's exact sequential lowering, eager and compiled + CUDA graphs), the
   grid eager + CUDA graphs (the fused configurations too), then the frontier points compiled + CUDA
   graphs (plain and deferred K/V; fused: plain); speed-ups against the best sequential step of this
   run;
5. report: ``frontier.json`` (points, summary), ``frontier.md`` and ``frontier.png``.

Each stage writes what it has (checkpoints, quality rows, timings) before the next begins, so a run
cut short keeps what it finished and a second run resumes from the checkpoints.

Device schedule (calls of at most 10 minutes, 30 device minutes a session): on one warm machine,
``run --stages train --models base-s0 base-s1 reg seq-l8 seq-l4`` (~8 min with the data), then
``--stages train --models sft-k1 sft-k2 sft-fused`` (~3 min), then ``--stages quality`` over
``--models base-s0 base-s1 reg`` and over the other five (~7 min each), each call copying
``work/*.json`` to ``$OUT``; ``assemble --quality-only`` on those files makes the frontier.json a
later session times with ``run --quality-from`` (~10 min, random weights) and ``--points``.

Partial-tail fine-tunes (``tail_variants``: the last 8 / 12 of 16 layers at K=2 h0 from ``reg``;
controls at 12 from ``base-s0`` and without the sequential terms; ``reg-cont``, ``reg`` trained on
with plain CE, the control of their extra tokens): one session, three calls on one warm machine
(``reg`` first, the same ``--work /tmp/frontier``), each copying ``work/*.json`` to ``$OUT``:
``run --stages train --models base-s0 reg`` (~6 min with the data: 72 s + 195 s of training);
``--stages train --models sft-tail8 sft-tail12 sft-tail12-base sft-tail12-solo reg-cont`` (~7 min:
~0.3 s/step x 250 steps each, from sft-k2's 0.24 s/step for 16 layers at K=2 plus the sequential
CE's 0.10 s and the teacher's forward, -solo ~0.2 s/step, reg-cont ~0.1 s/step; ``calibrate``
measures it as calib-sft-tail); ``--stages quality --models base-s0 reg sft-tail8 sft-tail12
sft-tail12-base sft-tail12-solo reg-cont`` (~8 min: ~2.3 each for the full grids, a tail's grid
is its P x K x init only).
K=1 tails (``k1_tail_variants``: the last 12 of 16 at K=1, as wide layers of 3, and the last 15;
the shallow controls' challengers): ``--stages train,quality --models reg sft-tail12-k1
sft-tail12-f3-k1 sft-tail15-k1`` after ``reg`` exists (~5 min of training, ~4 of quality), then
their timings, which no earlier run has (``--points 12:1:h0 15:1:h0 12:1:h0:f3``; the grid stage
times a chosen fused tail's wide layers at each K).
Timing does not depend on the weights: ``assemble --timings-from benchmarks/results/frontier.json``
on those files joins the earlier run's steps of the same shapes (8:2:h0, 12:2:h0, ...; the
configurations it lacks are listed untimed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import site
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import snlp_compile
from snlp_compile import SNLPConfig
from snlp_compile.models import build_model, config_of
from snlp_compile.models.kv import CachedStep
from snlp_compile.train import (
    RegulariserConfig,
    TrainConfig,
    load_checkpoint,
    load_corpus,
    train,
)
from snlp_compile.train.data import eval_windows
from snlp_compile.train.decode_eval import DecodeSetting, decode_perplexity, settings_grid
from snlp_compile.train.evaluate import perplexity
from snlp_compile.train.loop import Objective

from .common import (
    BEST_INDUCTOR,
    SNLP_INDUCTOR,
    copy_bandwidth,
    environment,
    floor_ms,
    inductor_options,
    layer_bytes,
    make_variant,
    parse_inductor_options,
    pyplot,
    time_fn,
    with_iterations,
)
from .decode import cache_writer, logits_only, step_inputs

MODEL = "nanochat-small"
BASELINE = "base-s0"


@dataclass(frozen=True)
class Scale:
    """Everything that sets the size of a run (the smoke scale checks the script on a CPU)."""

    n_layer: int = 16
    n_embd: int = 512
    n_head: int = 4
    seq_len: int = 1024
    vocab: int = 8192
    batch: int = 32
    steps: int = 700  # 700 x 32 x 1024 = 23M tokens per model
    finetune_steps: int = 250
    lr: float = 1.5e-3
    finetune_lr: float = 3e-4
    warmup: int = 80
    max_bytes: int = 60_000_000
    val_max_bytes: int = 4_000_000  # ~1.3M held-out tokens; the windows read 64 x 1025 spread over them
    bpe_sample_bytes: int = 6_000_000
    eval_windows: int = 64
    context: int = 1024  # decode timing: attention over this many positions
    parallel: tuple[int, ...] = (4, 8, 12, 16)
    iterations: tuple[int, ...] = (1, 2, 4)
    inits: tuple[str, ...] = ("h0", "warm")
    fusions: tuple[int, ...] = (2, 4)  # wide layers of M over all layers (the paper's ChunkB_{N/M}xFM)
    fused_iterations: tuple[int, ...] = (1, 2, 4)  # (init h0; K >= N/M is exact to the fused function)
    finetune_fusion: int = 4  # sft-fused trains through wide layers of this M
    device: str = "cuda"
    dtype: str = "bf16"

    def overrides(self, n_layer: int | None = None) -> dict[str, Any]:
        return {
            "n_layer": n_layer or self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_kv_head": self.n_head,
            "sequence_len": max(self.seq_len, self.context),
            "backout": False,
        }


SMOKE = Scale(
    n_layer=4, n_embd=64, n_head=2, seq_len=32, vocab=512, batch=4, steps=12, finetune_steps=6, warmup=2,
    max_bytes=400_000, val_max_bytes=100_000, bpe_sample_bytes=200_000, eval_windows=3, context=32, parallel=(2, 4),
    iterations=(1, 4), fusions=(2,), fused_iterations=(1,), finetune_fusion=2, device="cpu", dtype="fp32",
)  # fmt: skip


CPU_STUDY = Scale(
    n_layer=8, n_embd=128, n_head=2, seq_len=128, vocab=2048, batch=16, steps=600, finetune_steps=200, warmup=40,
    max_bytes=12_000_000, val_max_bytes=1_000_000, bpe_sample_bytes=2_000_000, eval_windows=16, context=128,
    parallel=(2, 4, 6, 8), iterations=(1, 2, 4), inits=("h0",), fusions=(), fused_iterations=(), device="cpu",
    dtype="fp32",
)  # fmt: skip
"""A study of the training recipes on this machine's CPUs (``--scale cpu --stages train,quality``:
~4 min per base model, ~12 min for reg, ~3-4 min per fine-tune on one core): the same variants at
L=8 (tails of 4 and 6), quality only; not a frontier (no GPU timing)."""

CPU_STUDY_16 = replace(CPU_STUDY, n_layer=16, parallel=(8, 12, 15, 16))
"""The CPU study at the GPU frontier's depth (``--scale cpu16``: L=16, otherwise ``cpu``; ~2x its
time): tails of 12 and 15 of 16 against the 8- and 4-layer controls, the analogue of the GPU's
question before a GPU is lent."""

SCALES = {"gpu": Scale(), "cpu": CPU_STUDY, "cpu16": CPU_STUDY_16, "smoke": SMOKE}


def scale_of(args: argparse.Namespace) -> Scale:
    """--smoke, else --scale (default: the GPU run's)."""
    return SMOKE if getattr(args, "smoke", False) else SCALES[getattr(args, "scale", "gpu")]


@dataclass(frozen=True)
class Variant:
    """One trained model: how it is trained and from what."""

    name: str
    objective: Objective = "ce"
    seed: int = 0
    n_layer: int | None = None  # None: the scale's depth
    init_from: str | None = None
    snlp: SNLPConfig | None = None
    note: str = ""
    seq_ce_weight: float | None = None  # TrainConfig's (None: 0 for snlp-forward)
    distill_weight: float = 0.0  # TrainConfig's: KL towards the frozen starting model
    quality_parallel: tuple[int, ...] | None = None  # the quality grid's parallel layers (None: the scale's)
    regulariser: RegulariserConfig | None = None  # objective "regulariser"/"both": None = the defaults


def tail_variants(scale: Scale) -> list[Variant]:
    """SNLP-forward fine-tunes of a partial tail (issue 20): the last P layers parallel at K=2, h0
    (the deployed configuration; 8, 12 and 14 of 16), from ``reg``, whose tails already converge best;
    at 12 of 16 two controls: from ``base-s0`` (what the regulariser's start is worth) and through
    the solve's cross-entropy alone (``-solo``, as ``sft-k*``: what keeping the sequential model
    costs the deployed point).

    Fine-tuning all 16 layers through the solve alone (``sft-k*``) cost the sequential model
    +46%/+218%; here the loss keeps it: the sequential cross-entropy (weight 1, the data) and the KL
    of the frozen starting model's sequential distribution to the K=2 one (weight 1, the function
    whose quality is kept: it pulls the solve towards the starting model rather than towards another
    function; both in nats per token, on the scale of the solve's cross-entropy). Same steps, lr and
    token budget as the other fine-tunes. Quality: their P at every K and init, and sequential.

    All but two layers at K=2 (``sft-tail14`` at L=16) is the first point that dominates a shallow
    control, narrowly. Measured (2026-12-05, one H100, one timing run): 14 of 16 at K=2, h0, +11.5%
    judged on the decode path (against ``reg-cont``; +2.2% against the baseline) at 0.191 ms, 1.90x;
    ``seq-l8`` +13.4% at 0.193 ms, 1.88x. The CPU study (``--scale cpu16``, judged: 12 of 16 at K=2
    +1.7%, 14 of 16 +4.3%, seed 1 +3.2%, 15 of 16 +7.2%) predicted +7.6% to +10.5%: the GPU's change
    was 2.7 times the CPU's. Its fine-tune peaks near 70 GB (``main`` sets expandable segments)."""
    n = scale.n_layer
    out: dict[str, Variant] = {}
    for par, start, keep in ((n // 2, "reg", True), (3 * n // 4, "reg", True), (3 * n // 4, BASELINE, True),
                             (3 * n // 4, "reg", False), (n - 2, "reg", True)):  # fmt: skip
        name = f"sft-tail{par}" + ("" if start == "reg" else "-base") + ("" if keep else "-solo")
        loss = f"+ sequential CE + KL to {start}" if keep else "the solve's CE alone"
        out[name] = (
            Variant(
                name, "snlp-forward", init_from=start, snlp=SNLPConfig(iterations=2, parallel_layers=par),
                note=f"{start} fine-tuned through the K=2 h0 solve of the last {par} of {n} layers, {loss}",
                seq_ce_weight=1.0 if keep else 0.0, distill_weight=1.0 if keep else 0.0, quality_parallel=(par,),
            )
        )  # fmt: skip
    return list(out.values())


def k1_tail_variants(scale: Scale) -> list[Variant]:
    """Tails fine-tuned through the K=1 solve (issue 20: the shallow controls): K=1 over most
    layers is the cheapest solve (one batched evaluation; at 12 of 16 about 4 sequential layers plus
    one iteration), and a tail trained at K=2 barely improves there (the H200's ``sft-tail12``: +27%
    at K=1 against +3.0% at K=2). From ``reg``, keeping the sequential model (CE + KL, as
    ``tail_variants``): the last 3/4 of the layers at K=1, the same tail as wide layers of 3 (the
    paper's chunkwise fusion, ``fused_layers=3``: 4 wide layers at 12 of 16; K=1 is the solve the
    loss trains, K >= 4 the fused function), and all but the first layer at K=1 (15 of 16: the
    only K=1 tail faster than L/4; the H200's staged timings put K=1 at 12 of 16 near 0.151 ms,
    2.4x, and at 15 of 16 near 0.094 ms, 3.8x: 0.019 ms per layer moved into the tail).

    CPU study (L=8, ``--scale cpu``; % against ``reg-cont``'s sequential 39.41, 16 windows): the
    last 6 at K=1 +10.5% (``sft-tail6``, trained at K=2: +16.1%), as wide layers of 3 +8.3%, the
    last 7 at K=1 +19.2%; ``seq-l4`` (half the depth) +15.0% against the baseline. At L=16
    (``--scale cpu16``, % judged): 12 of 16 at K=1 +7.2% (trained at K=2 +11.2%, ``reg-cont``
    +13.3%), as wide layers of 3 +7.7%, 15 of 16 at K=1 +28.8%; ``seq-l8`` +4.1%, ``seq-l4`` +19.8%
    (depth is worth less at this size than on the GPU: ``seq-l8`` +13.4% there)."""
    n = scale.n_layer
    out: dict[str, Variant] = {}
    for par, m in ((3 * n // 4, 1), (3 * n // 4, 3), (n - 1, 1)):
        if par < 2 or par % m:
            continue
        name = f"sft-tail{par}" + (f"-f{m}" if m > 1 else "") + "-k1"
        wide = f" as {par // m} wide layers of {m}" if m > 1 else ""
        out[name] = Variant(
            name, "snlp-forward", init_from="reg",
            snlp=SNLPConfig(iterations=1, parallel_layers=par, fused_layers=m),
            note=f"reg fine-tuned through the K=1 h0 solve of the last {par} of {n} layers{wide}, "
            "+ sequential CE + KL to reg",
            seq_ce_weight=1.0, distill_weight=1.0, quality_parallel=(par,),
        )  # fmt: skip
    return list(out.values())


def fused_tail(v: Variant) -> tuple[int, int] | None:
    """(parallel layers, M) of a variant trained through wide layers of a partial tail, else None."""
    if v.snlp is None or v.snlp.fused_layers <= 1 or v.quality_parallel is None:
        return None
    return v.quality_parallel[0], v.snlp.fused_layers


def continued_control(scale: Scale, start: str = "reg") -> Variant:
    """``start`` trained on for the fine-tunes' steps with plain cross-entropy (``{start}-cont``):
    the fine-tunes see ~36% more tokens than the models they start from, and these models are far
    from converged (0.46 tokens per parameter), so part of a fine-tune's gain is only more
    training; this control, at the same P, K and init, says how much (the H200 run: ``reg-cont``'s
    sequential perplexity fell 8.2%). ``reg-cont`` judges the tails from ``reg``, ``base-s0-cont``
    the fine-tunes from the baseline (``sft-k1``, ``sft-k2``, ``sft-fused``, ``sft-tail*-base``)."""
    n = scale.n_layer
    return Variant(
        f"{start}-cont", init_from=start, quality_parallel=(n // 2, 3 * n // 4),
        note=f"{start} trained on with plain CE for the fine-tunes' steps (control of their extra tokens)",
    )  # fmt: skip


def variants(scale: Scale) -> list[Variant]:
    n = scale.n_layer
    return [
        Variant("base-s0", note="unregularised baseline, seed 0"),
        Variant("base-s1", seed=1, note="unregularised baseline, seed 1 (the noise)"),
        Variant("reg", objective="regulariser", note="paper recipe: RegulariserConfig() defaults"),
        Variant(
            "sft-k1", "snlp-forward", init_from="base-s0", snlp=SNLPConfig(iterations=1),
            note=f"base-s0 fine-tuned through the K=1 solve, all {n} layers parallel",
        ),
        Variant(
            "sft-k2", "snlp-forward", init_from="base-s0", snlp=SNLPConfig(iterations=2),
            note=f"base-s0 fine-tuned through the K=2 solve, all {n} layers parallel",
        ),
        Variant(
            "sft-fused", "snlp-forward", init_from="base-s0",
            snlp=SNLPConfig(iterations=2, fused_layers=scale.finetune_fusion),
            note=f"base-s0 fine-tuned through the K=2 solve of {n // scale.finetune_fusion} wide layers "
            f"of {scale.finetune_fusion} (fused_layers={scale.finetune_fusion})",
        ),
        *tail_variants(scale),
        *k1_tail_variants(scale),
        continued_control(scale),
        continued_control(scale, BASELINE),
        Variant(f"seq-l{n // 2}", n_layer=n // 2, note=f"shallow sequential control, {n // 2} layers"),
        Variant(f"seq-l{n // 4}", n_layer=n // 4, note=f"shallow sequential control, {n // 4} layers"),
    ]  # fmt: skip


def timed_parallel(scale: Scale, chosen: list[Variant]) -> list[int]:
    """The timing grid's parallel layers: the scale's and the chosen variants' own quality grids'
    (a quality point is joined with the timing of its own configuration)."""
    extra = {p for v in chosen if fused_tail(v) is None for p in v.quality_parallel or ()}
    return sorted(set(scale.parallel) | extra)


def timed_fused_tails(chosen: list[Variant]) -> list[tuple[int, int]]:
    """The chosen fused tails' (parallel layers, M), timed at the scale's K (their quality grid)."""
    return list(dict.fromkeys(t for t in map(fused_tail, chosen) if t is not None))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- stage 1: data --------------------------------------------------------------------------------
def sources() -> list[str]:
    """The local Python sources: the standard library and the installed packages."""
    found = [sysconfig.get_paths()["stdlib"], *site.getsitepackages()]
    return [s for s in dict.fromkeys(found) if Path(s).is_dir()]


def prepare_data(scale: Scale, work: Path) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """(corpus, held-out windows, facts): cached under ``work`` so a resumed run re-reads them."""
    cache = work / "corpus.pt"
    if cache.exists():
        corpus = torch.load(cache, weights_only=False)
        log(f"data: reused {cache}")
    else:
        t0 = time.perf_counter()
        sample = load_corpus(
            sources(), max_bytes=scale.bpe_sample_bytes, tokenizer="bpe", bpe_vocab_size=scale.vocab
        )
        tok = sample.tokenizer
        log(
            f"data: BPE vocab {tok.vocab_size} trained on {scale.bpe_sample_bytes:,} bytes in {time.perf_counter() - t0:.0f} s"
        )
        corpus = load_corpus(
            sources(), max_bytes=scale.max_bytes, val_max_bytes=scale.val_max_bytes, tokenizer=tok
        )
        torch.save(corpus, cache)
        log(f"data: {corpus.describe()} ({time.perf_counter() - t0:.0f} s)")
    windows = eval_windows(corpus.val, scale.seq_len, scale.eval_windows)
    facts = {
        "describe": corpus.describe(),
        "train_tokens": corpus.train.numel(),
        "val_tokens": corpus.val.numel(),
        "val_bytes_per_token": corpus.val_bytes_per_token,
        "eval_windows": list(windows.shape),
    }
    return corpus, windows, facts


# -- stage 2: train -------------------------------------------------------------------------------
def checkpoint_path(work: Path, name: str) -> Path:
    return work / f"{name}.safetensors"


def train_flops_per_token(n_params: int, n_layer: int, seq_len: int, n_embd: int) -> float:
    """Forward + backward FLOPs per token: 6 N plus the attention scores (Kaplan et al.)."""
    return 6.0 * n_params + 6.0 * n_layer * seq_len * n_embd


def train_variant(v: Variant, scale: Scale, corpus: Any, work: Path) -> dict[str, Any]:
    """Train (or reuse) one variant's checkpoint; returns what the report needs about it."""
    path = checkpoint_path(work, v.name)
    facts_path = work / f"{v.name}.train.json"
    if path.exists() and facts_path.exists():
        log(f"train {v.name}: reused {path}")
        return json.loads(facts_path.read_text())
    finetune = v.init_from is not None
    steps = scale.finetune_steps if finetune else scale.steps
    cfg = TrainConfig(
        model=MODEL,
        model_overrides=scale.overrides(v.n_layer),
        steps=steps,
        batch_size=scale.batch,
        seq_len=scale.seq_len,
        lr=scale.finetune_lr if finetune else scale.lr,
        warmup_steps=min(scale.warmup, steps),
        seed=v.seed,
        device=scale.device,
        objective=v.objective,
        regulariser=(v.regulariser or RegulariserConfig())
        if v.objective in ("regulariser", "both")
        else None,
        snlp=v.snlp,
        seq_ce_weight=v.seq_ce_weight,
        distill_weight=v.distill_weight,
        init_from=str(checkpoint_path(work, v.init_from)) if v.init_from is not None else None,
        eval_windows=min(64, scale.eval_windows),
    )
    log(f"train {v.name}: {v.note}; {steps} steps x {scale.batch} x {scale.seq_len}")
    res = train(cfg, corpus)
    # (the training record and the data spec: `snlp-compile eval` then reads the same held-out text)
    res.save(path, variant=v.name, data=corpus.spec)
    layers = res.model.get_submodule("transformer.h")
    n_params = sum(p.numel() for p in layers.parameters())
    n_layer = v.n_layer or scale.n_layer
    facts = {
        "name": v.name,
        "note": v.note,
        "objective": v.objective,
        "seed": v.seed,
        "n_layer": n_layer,
        "init_from": v.init_from,
        "snlp": None if v.snlp is None else asdict(v.snlp),
        "regulariser": None if cfg.regulariser is None else asdict(cfg.regulariser),
        "seq_ce_weight": cfg.seq_weight,
        "distill_weight": v.distill_weight,
        "layer_params": n_params,
        "steps": steps,
        "tokens": res.tokens,
        "tokens_per_layer_param": res.tokens / n_params,
        "train_flops": res.tokens * train_flops_per_token(n_params, n_layer, scale.seq_len, scale.n_embd),
        "train_seconds": res.seconds,
        "val_full_forward": res.val,
        "last": res.history[-1],
    }
    facts_path.write_text(json.dumps(facts, indent=1, default=str))
    log(f"train {v.name}: done in {res.seconds:.0f} s, held-out ppl {res.val.get('ppl', float('nan')):.3f}")
    return facts


# -- stage 3: quality -----------------------------------------------------------------------------
def load_for_inference(
    work: Path, name: str, scale: Scale, n_layer: int | None = None, purpose: str = "speed"
) -> torch.nn.Module:
    """The trained checkpoint, else (a speed-only run, or the graph check, which compares two ways
    of running the same weights) the same shape with seeded random weights."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[scale.dtype]
    path = checkpoint_path(work, name)
    if path.exists():
        model = load_checkpoint(path, device=scale.device)
    else:
        overrides = {**scale.overrides(n_layer), "vocab_size": scale.vocab, "zero_init_out": False}
        model = build_model(MODEL, seed=0, device=scale.device, **overrides)
        log(f"{purpose} {name}: no checkpoint, random weights of the same shape")
    return model.to(dtype).eval()


def quality_from(path: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Quality rows and trained-model facts of an earlier frontier.json, for a speed-only run
    (checkpoints do not outlive the machine that trained them; the weights do not change timings)."""
    result = json.loads(path.read_text())
    keys = ("model", "parallel_layers", "iterations", "init", "ppl", "bpb")
    rows = [{**{k: p[k] for k in keys}, "fusion": fusion_of(p)} for p in result["points"]]
    return rows, result["models"]


def fusion_of(p: dict[str, Any]) -> int:
    """A point's (or quality row's) fusion M, 1 for none (earlier runs wrote "none" or nothing)."""
    value = p.get("fusion", 1)
    return 1 if value in (None, "none") else int(value)


def measure_quality(
    v: Variant, scale: Scale, windows: torch.Tensor, bytes_per_token: float, work: Path
) -> list[dict[str, Any]]:
    path = work / f"{v.name}.quality.json"
    if path.exists():
        return json.loads(path.read_text())
    model = load_for_inference(work, v.name, scale)
    n = v.n_layer or scale.n_layer
    tail = fused_tail(v)
    if tail is not None:  # (a fused tail: its wide layers at K x h0, K >= P / M the fused function)
        par_, m = tail
        grid = [DecodeSetting(None)] + [DecodeSetting(k, par_, "h0", m) for k in scale.iterations]
    elif v.n_layer is None:  # (a model trained for its own parallel layers: those only, no fusion)
        par = [None if p >= n else p for p in v.quality_parallel or scale.parallel]
        grid = settings_grid(par, scale.iterations, scale.inits)
        if v.quality_parallel is None:
            grid += [DecodeSetting(k, None, "h0", m) for m in scale.fusions for k in scale.fused_iterations]
    else:
        grid = [DecodeSetting(None)]
    t0 = time.perf_counter()

    def show(r: Any) -> None:
        log(f"quality {v.name} {r.setting.label():<26} ppl {r.ppl:9.4f}  ({time.perf_counter() - t0:.0f} s)")

    results = decode_perplexity(model, windows, grid, bytes_per_token=bytes_per_token, progress=show)
    full = perplexity(model, windows, scale.batch, scale.device, bytes_per_token)
    rows = []
    for r in results:
        row = {"model": v.name, **r.row()}
        row["fusion"] = row.pop("fused_layers")
        if row["parallel_layers"] is None and row["iterations"] is not None:
            row["parallel_layers"] = n
        if r.setting.sequential:
            row["parallel_layers"] = 0
            row["full_forward_ppl"] = full["ppl"]
        rows.append(row)
    path.write_text(json.dumps(rows, indent=1))
    del model
    return rows


def graph_check(work: Path, scale: Scale, windows: torch.Tensor, bytes_per_token: float) -> dict[str, float]:
    """The CUDA-graph replay of the teacher-forced sweep against the eager loop on a few windows:
    the quality grid relies on it, so every run checks it (cross entropies, nats)."""
    model = load_for_inference(work, BASELINE, scale, purpose="graph check")
    few = windows[:2, : min(windows.size(1), 65)]
    grid = [DecodeSetting(None), DecodeSetting(1, None, "warm"), DecodeSetting(2, scale.n_layer // 2, "h0")]
    grid += [DecodeSetting(2, None, "h0", max(scale.fusions))] if scale.fusions else []
    graphed = decode_perplexity(model, few, grid, bytes_per_token=bytes_per_token, graphs=True)
    eager = decode_perplexity(model, few, grid, bytes_per_token=bytes_per_token, graphs=False)
    check = {g.setting.label(): abs(g.ce - e.ce) for g, e in zip(graphed, eager)}
    check["all_graphed"] = float(all(g.graphs for g in graphed))
    log(f"graph check (|ce graph - ce eager|): {check}")
    return check


# -- stage 4: speed -------------------------------------------------------------------------------
@dataclass
class Timed:
    model: str
    parallel_layers: int  # 0: sequential
    iterations: int | None
    init: str | None
    variant: str  # e.g. "seq compiled+graph", "snlp eager+graph", "snlp deferred compiled+graph"
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    fusion: int = 1  # wide layers of M (fused_layers); 1: none


class Timer:
    """Times batch-1 decode steps of one model at one context, the way ``Decoder`` runs them."""

    def __init__(
        self, model: torch.nn.Module, name: str, scale: Scale, snlp_options: dict[str, Any], work: Path
    ):
        self.model, self.name, self.scale, self.work = model, name, scale, work
        self.device = torch.device(scale.device)
        self.n_layer = config_of(model).n_layer
        self.step = CachedStep(model)
        self.inputs = step_inputs(model, 1, scale.context, config_of(model).vocab_size, self.device)
        _, pos, k_cache, v_cache = self.inputs
        self.write = cache_writer(k_cache, v_cache, pos)
        self.compiled: dict[str, Any] = {}
        self.snlp_options = snlp_options
        self.rows: list[Timed] = []
        self.kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
        self.weight_bytes = layer_bytes(model)

    def time(self, row: Timed, base: Any, mode: str, deferred: bool = False) -> Timed:
        t0 = time.perf_counter()
        try:
            key = f"{row.variant} {row.parallel_layers} {row.iterations} {row.init} {row.fusion}"
            options = None if row.parallel_layers == 0 else self.snlp_options
            post = logits_only if deferred else self.write
            fn = make_variant(base, mode, self.inputs, self.device, self.compiled, key, post, options)
            fn()
            samples = 300 if self.device.type == "cuda" else 10
            t = time_fn(fn, self.device, warmup=20 if samples > 10 else 2, samples=samples)
            row.median_ms, row.p10_ms, row.p90_ms = t.median_ms, t.p10_ms, t.p90_ms
        except Exception as exc:  # one variant failing must not lose the run
            row.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        row.extra["build_and_time_s"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        save_timing(self.work, row)
        ms = f"{row.median_ms:.4f} ms" if row.median_ms else row.error
        fused = f" F={row.fusion}" if row.fusion > 1 else ""
        log(
            f"speed {self.name} par={row.parallel_layers}{fused} K={row.iterations} {row.init} {row.variant}: {ms}"
        )
        return row

    def sequential(self, modes: list[str]) -> None:
        for mode in modes:
            self.time(Timed(self.name, 0, None, None, f"seq {mode}"), self.step, mode)
        if self.n_layer > 1:  # the compiler's exact sequential lowering: K=1, one stage per layer
            exact = snlp_compile.transform(self.step, self.inputs, iterations=1, stages=self.n_layer)
            for mode in modes:
                self.time(Timed(self.name, 0, None, None, f"exact-seq {mode}"), exact, mode)

    def grid(self, parallel: list[int], iterations: list[int], inits: list[str], mode: str) -> None:
        for par in parallel:
            for init in inits:
                t = snlp_compile.transform(
                    self.step, self.inputs, iterations=1, parallel_layers=par, init=init
                )
                for k in iterations:
                    self.time(
                        Timed(self.name, par, k, init, f"snlp {mode}"), with_iterations(t, k, init), mode
                    )
                del t

    def fused_grid(self, settings: list[tuple[int, int]], iterations: list[int], mode: str) -> None:
        """Wide layers of M over the last P layers, init h0, for each (P, M) in ``settings`` (the
        quality grid's fused settings)."""
        for par, m in settings:
            t = snlp_compile.transform(
                self.step, self.inputs, iterations=1, parallel_layers=par, fused_layers=m, init="h0"
            )
            for k in iterations:
                row = Timed(self.name, par, k, "h0", f"snlp {mode}", fusion=m)
                self.time(row, with_iterations(t, k, "h0"), mode)
            del t

    def point(self, par: int, k: int, init: str, mode: str, fusion: int = 1) -> None:
        if fusion > 1:  # (wide layers need stages=1 and no deferred K/V: the plain solve only)
            row = Timed(self.name, par, k, init, f"snlp {mode}", fusion=fusion)
            try:
                t = snlp_compile.transform(
                    self.step, self.inputs, iterations=k, parallel_layers=par, init=init, fused_layers=fusion
                )
            except snlp_compile.SNLPError as exc:  # e.g. PAR not a multiple of M: a --points typo
                row.error = f"{type(exc).__name__}: {str(exc)[:300]}"
                self.rows.append(row)
                save_timing(self.work, row)
                log(f"speed {self.name} par={par} F={fusion} K={k} {init}: {row.error}")
                return
            self.time(row, t, mode)
            return
        if par < self.n_layer:
            # the same function as parallel_layers=par, its sequential layers lowered as one-layer
            # stages (the exact-seq lowering) rather than as written; deferred K/V needs all layers
            staged = (1,) * (self.n_layer - par) + (par,)
            t = snlp_compile.transform(self.step, self.inputs, iterations=k, stages=staged, init=init)
            self.time(Timed(self.name, par, k, init, f"snlp staged {mode}"), t, mode)
            return
        t = snlp_compile.transform(self.step, self.inputs, iterations=k, parallel_layers=par, init=init)
        self.time(Timed(self.name, par, k, init, f"snlp {mode}"), t, mode)
        d = snlp_compile.transform(
            self.step, self.inputs, iterations=k, parallel_layers=par, init=init, deferred_kv=True
        )
        self.time(Timed(self.name, par, k, init, f"snlp deferred {mode}"), d, mode, deferred=True)

    def floor_ms(self, bandwidth: float) -> float:
        return floor_ms(self.weight_bytes + self.kv_bytes, bandwidth)


def save_timing(work: Path, row: Timed) -> None:
    """Append one timing to ``work/timings.json``, so a run cut short keeps every step it timed."""
    path = work / "timings.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*rows, asdict(row)], indent=1))


def load_timings(work: Path, log: Path | None) -> list[Timed]:
    """The timings of a run: ``work/timings.json``, else the ``speed ...`` lines of its log (runs
    before timings.json existed)."""
    path = work / "timings.json"
    if path.exists():
        return [Timed(**r) for r in json.loads(path.read_text())]
    if log is None:
        raise SystemExit(f"frontier: no {path} and no --log to read timings from")
    rows = []
    pattern = re.compile(r"speed (\S+) par=(\d+)(?: F=(\d+))? K=(\S+) (\S+) (.+): ([0-9.]+) ms$")
    for line in log.read_text().splitlines():
        m = pattern.search(line)
        if m:
            model, par, fused, k, init, variant, ms = m.groups()
            rows.append(
                Timed(
                    model,
                    int(par),
                    None if k == "None" else int(k),
                    None if init == "None" else init,
                    variant,
                    float(ms),
                    extra={"from_log": True},
                    fusion=int(fused or 1),
                )
            )
    return rows


TIMED_SHAPE = ("n_layer", "n_embd", "n_head", "vocab", "context", "dtype")


def merge_earlier(
    quality: list[dict[str, Any]], trained: dict[str, dict[str, Any]], earlier: Path
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """This run's quality rows and models, plus an earlier frontier.json's for the models this run
    did not measure (a model measured here replaces all of its earlier rows and facts)."""
    rows, models = quality_from(earlier)
    measured = {q["model"] for q in quality}
    kept = [r for r in rows if r["model"] not in measured]
    facts = {n: m for n, m in models.items() if n not in trained and n not in measured}
    return kept + quality, {**facts, **trained}


TIMING_META = ("floor_ms", "copy_bandwidth_tbs", "inductor")  # (meta facts that come with timings)


def timings_from(path: Path, scale: Scale) -> tuple[list[Timed], dict[str, Any]]:
    """An earlier frontier.json's timings, for models of this scale's shape (timing does not depend
    on the weights, the shape it does: another shape is refused by name), and the meta facts that
    come with them (``TIMING_META``: their floor and compile options)."""
    earlier = json.loads(path.read_text())
    theirs = earlier.get("meta", {}).get("scale", {})
    differ = [k for k in TIMED_SHAPE if theirs.get(k) != getattr(scale, k)]
    if differ:
        got = ", ".join(f"{k}={theirs.get(k)!r} (here {getattr(scale, k)!r})" for k in differ)
        raise SystemExit(f"frontier assemble: --timings-from {path} timed another shape: {got}")
    facts = {key: earlier["meta"][key] for key in TIMING_META if key in earlier.get("meta", {})}
    return [Timed(**r) for r in earlier["timings"]], facts


# -- stage 5: the frontier ------------------------------------------------------------------------
def best_ms(rows: list[Timed], **match: Any) -> tuple[float | None, str | None]:
    hits = [r for r in rows if r.median_ms is not None and all(getattr(r, k) == v for k, v in match.items())]
    if not hits:
        return None, None
    best = min(hits, key=lambda r: r.median_ms or math.inf)
    return best.median_ms, best.variant


def build_points(
    quality: list[dict[str, Any]], timed: list[Timed], trained: dict[str, dict[str, Any]], scale: Scale
) -> dict[str, Any]:
    """Join quality and speed: one point per (model, parallel layers, K, init, fusion)."""
    base_ppl = next(q["ppl"] for q in quality if q["model"] == BASELINE and q["iterations"] is None)
    seq_ppl = {q["model"]: q["ppl"] for q in quality if q["iterations"] is None}
    deep = [r for r in timed if r.model == BASELINE]
    best_seq, best_seq_variant = best_ms([r for r in deep if r.parallel_layers == 0])
    points = []
    for q in quality:
        info = trained.get(q["model"], {})
        shallow = info.get("n_layer", scale.n_layer) < scale.n_layer
        fusion = fusion_of(q)
        if q["iterations"] is None:  # (a deep model's sequential step is timed once, on the baseline)
            source = q["model"] if shallow else BASELINE
            ms, variant = best_ms([r for r in timed if r.model == source and r.parallel_layers == 0])
            par = 0
        else:
            par = q["parallel_layers"]
            ms, variant = best_ms(
                deep, parallel_layers=par, iterations=q["iterations"], init=q["init"], fusion=fusion
            )
        points.append(
            {
                "model": q["model"],
                "kind": "shallow-control" if shallow else ("sequential" if par == 0 else "snlp"),
                "n_layer": info.get("n_layer", scale.n_layer),
                "parallel_layers": par,
                "iterations": q["iterations"],
                "init": q["init"],
                "fusion": fusion,
                "ppl": q["ppl"],
                "ppl_vs_baseline": q["ppl"] / base_ppl - 1.0,
                **judgement(q["model"], q["ppl"], info, seq_ppl),
                "bpb": q["bpb"],
                "decode_ms": ms,
                "timed_variant": variant,
                "best_seq_ms": best_seq,
                "speedup": None if ms is None or best_seq is None else best_seq / ms,
            }
        )
    return {
        "points": points,
        "best_seq_ms": best_seq,
        "best_seq_variant": best_seq_variant,
        "base_ppl": base_ppl,
    }


def token_control(
    model: str, info: dict[str, Any], seq_ppl: dict[str, float]
) -> tuple[str | None, float | None]:
    """(the model of the same token budget, its sequential perplexity) that a point is also judged
    against: a fine-tune saw the tokens of its start model plus its own, and at 0.46 tokens per
    parameter more tokens alone lower the perplexity (a CPU study at L=8: ``reg`` trained on with
    plain CE for the fine-tunes' steps fell 7%, more than the tail fine-tunes' sequential models), so
    a fine-tune compares with ``{start}-cont``, its start trained on with plain CE for the same steps
    (``continued_control``); models trained from scratch have the baseline's budget: (BASELINE, None)
    meaning the baseline itself. A fine-tune whose control was not trained: (None, None)."""
    start = info.get("init_from")
    if start is None:
        return BASELINE, seq_ppl.get(BASELINE)
    name = model if model.endswith("-cont") else f"{start}-cont"
    return (name, seq_ppl[name]) if name in seq_ppl else (None, None)


def judgement(model: str, ppl: float, info: dict[str, Any], seq_ppl: dict[str, float]) -> dict[str, Any]:
    """A point's token control, its change against that control's sequential perplexity, and what
    the goals judge: the worse of that and the change against the baseline (None: not judged)."""
    control, control_ppl = token_control(model, info, seq_ppl)
    vs_control = None if control_ppl is None else ppl / control_ppl - 1.0
    vs_baseline = ppl / seq_ppl[BASELINE] - 1.0
    return {
        "token_control": control,
        "ppl_vs_token_control": vs_control,
        "ppl_judged": None if vs_control is None else max(vs_baseline, vs_control),
    }


def rejudge(result: dict[str, Any]) -> dict[str, Any]:
    """An earlier frontier.json's points and summary as today's rules judge them (``report``)."""
    seq_ppl = {p["model"]: p["ppl"] for p in result["points"] if p["iterations"] is None}
    points = [{**p, **judgement(p["model"], p["ppl"], result["models"].get(p["model"], {}), seq_ppl)}
              for p in result["points"]]  # fmt: skip
    return {**result, "points": points, "summary": summarise(points)}


def judged(p: dict[str, Any]) -> float | None:
    """The perplexity change the goals judge (points of older runs: against the baseline alone)."""
    return p["ppl_judged"] if "ppl_judged" in p else p["ppl_vs_baseline"]


def summarise(points: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [p for p in points if p["kind"] == "snlp" and p["speedup"] is not None]
    snlp = [p for p in timed if judged(p) is not None]

    def within(p: dict[str, Any], bound: float) -> bool:
        j = judged(p)
        return j is not None and j <= bound

    def best_within(bound: float) -> dict[str, Any] | None:
        ok = [p for p in snlp if within(p, bound)]
        return max(ok, key=lambda p: p["speedup"]) if ok else None

    def brief(p: dict[str, Any] | None) -> dict[str, Any] | None:
        keys = ("model", "parallel_layers", "iterations", "init", "fusion", "ppl_vs_baseline", "speedup",
                "decode_ms")  # fmt: skip
        return None if p is None else {k: p[k] for k in keys}

    controls = {}
    for c in (p for p in points if p["kind"] == "shallow-control" and p["speedup"] is not None):
        dom = [s for s in snlp if s["speedup"] >= c["speedup"] and within(s, c["ppl_vs_baseline"])]
        controls[c["model"]] = {
            "ppl_vs_baseline": c["ppl_vs_baseline"],
            "speedup": c["speedup"],
            "dominated": bool(dom),
            "dominated_by": brief(max(dom, key=lambda s: s["speedup"])) if dom else None,
        }
    seeds = [p for p in points if p["kind"] == "sequential" and re.fullmatch(r"base-s\d+", p["model"])]
    within1, within5 = best_within(0.01), best_within(0.05)
    return {
        "best_speedup_within_1pct": within1["speedup"] if within1 else None,
        "best_point_within_1pct": brief(within1),
        "best_speedup_within_5pct": within5["speedup"] if within5 else None,
        "best_point_within_5pct": brief(within5),
        "shallow_controls": controls,
        "seed_spread_ppl_vs_baseline": {p["model"]: p["ppl_vs_baseline"] for p in seeds},
        "not_judged": sorted({p["model"] for p in points if judged(p) is None}),  # (timed or not)
        "goals": {
            ">=2.0x at <=+1%": bool(within1 and within1["speedup"] >= 2.0),
            ">=3.0x at <=+5%": bool(within5 and within5["speedup"] >= 3.0),
            "shallow controls dominated": bool(controls) and all(c["dominated"] for c in controls.values()),
        },
    }


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The judged points no other beats on both speed-up and judged perplexity change (a fine-tune
    is not ahead only because it saw more tokens than the models beside it)."""
    live = [(p, j) for p in points if p["speedup"] is not None and (j := judged(p)) is not None]
    front, best = [], math.inf
    for p, j in sorted(live, key=lambda pj: (-pj[0]["speedup"], pj[1])):
        if j < best - 1e-6:  # (exact points differ from sequential by rounding)
            front.append(p)
            best = j
    return front


def pct(change: float | None, digits: int = 2) -> str:
    """A relative change as a signed percentage ("" when not measured)."""
    return "" if change is None else f"{100 * change:+.{digits}f}%"


def plotted(p: dict[str, Any]) -> float:
    """A point's height in the plot, in %: its judged change (not judged: against the baseline)."""
    j = judged(p)
    return 100 * (p["ppl_vs_baseline"] if j is None else j)


def markdown(result: dict[str, Any]) -> str:
    s, meta = result["summary"], result["meta"]
    unmeasured = bool(meta.get("incomplete")) and not meta["incomplete"].get("snlp_compiled_points")
    quality_only = bool(meta.get("quality_only"))  # (a study that never times: no speed claims)

    def verdict(goal: str) -> str:
        if s["goals"][goal]:
            return "met"
        return "not measured: no SNLP point compiled" if unmeasured else "missed"

    num = lambda x, f=".3f": "" if x is None else format(x, f)  # noqa: E731
    speed = (
        ""
        if quality_only
        else f" Best sequential step {num(result['best_seq_ms'], '.4f')} ms ({result['best_seq_variant']}); "
        f"bytes floor {num(meta.get('floor_ms'), '.4f')} ms."
    )
    lines = [
        "## Frontier: decode-path perplexity against decode speed-up",
        "",
        f"Device: {meta['env'].get('gpu') or meta['env'].get('cpu')}, torch {meta['env']['torch']}. "
        f"{meta['scale_note']}{speed} "
        f"Baseline ({BASELINE}) sequential decode perplexity {result['base_ppl']:.4f}.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    gaps = meta.get("incomplete")
    if quality_only:
        lines += [
            "**Quality only** (`assemble --quality-only`): perplexities measured, no step timed, so no "
            "speed goal, Pareto point or control domination is claimed.",
            "",
        ]
    elif gaps:
        lines += [
            f"**Incomplete run.** {gaps['note']} Not timed: {len(gaps['untimed_configs'])} configurations "
            f"(parallel, K, init, fusion): {', '.join(str(tuple(c)) for c in gaps['untimed_configs'])}. SNLP points "
            f"compiled + CUDA graphs: {gaps['snlp_compiled_points']}.",
            "",
        ]
    if not quality_only:
        lines += [
            "| goal | result |",
            "|---|---|",
            f"| >= 2.0x at <= +1% | {num(s['best_speedup_within_1pct'], '.2f')}x ({verdict('>=2.0x at <=+1%')}) |",
            f"| >= 3.0x at <= +5% | {num(s['best_speedup_within_5pct'], '.2f')}x ({verdict('>=3.0x at <=+5%')}) |",
        ]
        for name, c in s["shallow_controls"].items():
            by = c["dominated_by"]
            how = (
                ""
                if not by
                else f" by {by['model']} par={by['parallel_layers']} K={by['iterations']} {by['init']}"
                + (f" fused={fusion_of(by)}" if fusion_of(by) > 1 else "")
            )
            lines.append(
                f"| control {name} ({pct(c['ppl_vs_baseline'])}, {c['speedup']:.2f}x) dominated | "
                f"{'yes' + how if c['dominated'] else 'no'} |"
            )
        lines.append("")
    spread = ", ".join(f"{k} {pct(v)}" for k, v in s["seed_spread_ppl_vs_baseline"].items())
    lines += [f"Seed spread of the baseline's sequential perplexity: {spread}.", ""]
    lines += [
        "A fine-tune is judged by the worse of its change against the baseline and against its start "
        "model trained on with plain cross-entropy for the same steps (`reg-cont`, `base-s0-cont`: the same tokens). "
        + (
            f"Not judged (that control not trained): {', '.join(s['not_judged'])}."
            if s.get("not_judged")
            else ""
        ),
        "",
    ]
    if not quality_only:
        lines += [
            "Pareto points (faster first, by the judged change; every point of every model in frontier.json; fused: "
            "wide layers of M, the paper's fusion, none when empty):",
            "",
            "| model | parallel | K | init | fused | ppl | vs baseline | vs same tokens | decode ms | speed-up | timed as |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in pareto(result["points"]):
            m = fusion_of(p)
            lines.append(
                f"| {p['model']} | {p['parallel_layers']} | {p['iterations'] or ''} | {p['init'] or ''} | "
                f"{m if m > 1 else ''} | "
                f"{p['ppl']:.3f} | {pct(p['ppl_vs_baseline'])} | {pct(p.get('ppl_vs_token_control'))} | "
                f"{num(p['decode_ms'], '.4f')} | "
                f"{num(p['speedup'], '.2f')}x | {p['timed_variant']} |"
            )
    if lines[-1] == "":  # (quality only: no Pareto table, and the grid brings its own blank line)
        lines.pop()
    lines += quality_grid(result["points"])
    if any(judged(p) != p["ppl_vs_baseline"] for p in result["points"]):  # (fine-tunes: their token control)
        title = "The same, judged (the worse of the change against the baseline and against the same tokens)"
        lines += quality_grid(result["points"], judged, title)
    lines += [
        "",
        "Models:",
        "",
        "| model | objective | layers | tokens | with its start's | tokens/param | train FLOPs | train s | note |",
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    models = result["models"]
    for m in models.values():
        if "train_seconds" not in m:  # (a model known only by its shape)
            continue
        total = total_tokens(m["name"], models)
        lines.append(
            f"| {m['name']} | {m['objective']} | {m['n_layer']} | {m['tokens']:,} | "
            f"{'' if total is None else format(total, ',')} | {m['tokens_per_layer_param']:.2f} | "
            f"{m['train_flops']:.2e} | {m['train_seconds']:.0f} | {m['note']} |"
        )
    return "\n".join(lines) + "\n"


def total_tokens(name: str, models: dict[str, dict[str, Any]]) -> int | None:
    """The tokens a model has seen: its own and, for a fine-tune, its start model's (None: a start
    not among ``models``)."""
    m = models[name]
    start = m.get("init_from")
    if start is None:
        return int(m["tokens"])
    before = total_tokens(start, models) if start in models and "tokens" in models[start] else None
    return None if before is None else before + int(m["tokens"])


def quality_grid(
    points: list[dict[str, Any]],
    value: Callable[[dict[str, Any]], float | None] = lambda p: p["ppl_vs_baseline"],
    title: str = "Decode-path perplexity vs the baseline's sequential",
) -> list[str]:
    """A perplexity change (``value``: against the baseline, or the judged one) one row per model and
    init, one column per (parallel layers, K, fusion): the whole quality grid at a glance (the
    shallow controls: their sequential change alone)."""
    snlp = [p for p in points if p["kind"] == "snlp"]
    key = lambda p: (fusion_of(p), p["parallel_layers"], p["iterations"])  # noqa: E731
    cols = sorted({key(p) for p in snlp})
    if not cols:
        return []
    head = [f"{par}/K={k}" + (f"/F{m}" if m > 1 else "") for m, par, k in cols]
    lines = [
        "",
        f"{title} (all measured points; /FM: wide layers of M, the fused function):",
        "",
        "| model | init | seq | " + " | ".join(head) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    seq = {p["model"]: value(p) for p in points if p["parallel_layers"] == 0}
    for model in dict.fromkeys(p["model"] for p in points):  # (the shallow controls: seq alone)
        for init in dict.fromkeys(p["init"] for p in snlp if p["model"] == model) or [""]:
            got = {key(p): value(p) for p in snlp if p["model"] == model and p["init"] == init}
            cells = [pct(got.get(c), 1) for c in cols]
            if seq.get(model) is None and not any(cells):  # (not judged: its token control not trained)
                continue
            lines.append(f"| {model} | {init} | {pct(seq.get(model), 2)} | " + " | ".join(cells) + " |")
    return lines


def model_colours(plt: Any, n: int) -> list[Any]:
    """n distinct colours, one per model: tab10's ten, then tab20's light shades (up to 20), then
    evenly spaced samples of a wide colormap (matplotlib's default cycle repeats after ten)."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        tab20 = plt.get_cmap("tab20")
        return [tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))][:n]
    return [plt.get_cmap("gist_rainbow")(i / (n - 1)) for i in range(n)]


def y_bottom(values: list[float]) -> float:
    """The lower y-limit (%) of the frontier plot: -1%, or below the lowest value with a margin
    when one lies lower (the y axis is symlog: linear within +-2%, logarithmic beyond)."""
    low = min(values, default=0.0)
    if low > -0.8:
        return -1.0
    return low - 0.5 if low > -2.0 else 1.3 * low


def figure(result: dict[str, Any], pts: list[dict[str, Any]], plt: Any) -> Any:
    """The frontier plot of ``pts`` (the timed points of ``result``) as a matplotlib figure."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    labelled = False  # (one legend entry for every model's fused points)
    models = list(dict.fromkeys(p["model"] for p in pts))
    for model, colour in zip(models, model_colours(plt, len(models))):
        mine = [p for p in pts if p["model"] == model]
        if mine[0]["kind"] == "shallow-control":
            ax.scatter([p["speedup"] for p in mine], [plotted(p) for p in mine], color=colour,
                       marker="*", s=220, edgecolor="k", zorder=5, label=f"{model} (sequential)")  # fmt: skip
        else:
            plain = [p for p in mine if fusion_of(p) == 1]
            fused = [p for p in mine if fusion_of(p) > 1]
            name = model if judged(mine[0]) is not None else f"{model} (not judged: vs baseline)"
            ax.scatter([p["speedup"] for p in plain], [plotted(p) for p in plain],
                       s=22, alpha=0.8, color=colour, label=name)  # fmt: skip
            if fused:  # the fused function: triangles in the model's colour
                ax.scatter([p["speedup"] for p in fused], [plotted(p) for p in fused],
                           s=30, alpha=0.8, marker="^", color=colour,
                           label="_" if labelled else "fused (wide layers; model colour)")  # fmt: skip
                labelled = True
    front = pareto(pts)
    ax.plot(
        [p["speedup"] for p in front],
        [plotted(p) for p in front],
        "k--",
        lw=1,
        label="Pareto",
    )
    spread = [100 * v for v in result["summary"]["seed_spread_ppl_vs_baseline"].values()]
    if spread:
        ax.axhspan(min(0.0, *spread), max(0.0, *spread), color="grey", alpha=0.2, label="seed spread")
    for y in (1, 5):
        ax.axhline(y, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=2.0)
    ax.set_ylim(bottom=y_bottom([plotted(p) for p in pts] + spread))
    ax.set_xlabel("decode speed-up over the best sequential step (batch 1, same run)")
    ax.set_ylabel("decode-path perplexity change (%)\n(worse of: vs baseline, vs same tokens)")
    ax.set_title("Speed at equal quality: SNLP points (triangles: fused) and shallow sequential controls")
    # (outside the axes: inside, some corner always holds points of one model or another)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=2 if len(models) > 10 else 1)
    fig.tight_layout()
    return fig


def plot(result: dict[str, Any], path: Path) -> Path | None:
    pts = [p for p in result["points"] if p["speedup"] is not None]
    plt = pyplot()
    if plt is None or not pts:
        if not pts:
            log("report: no timed point, no plot")
        return None
    fig = figure(result, pts, plt)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "frontier.md").write_text(markdown(result))
    png = plot(result, out / "frontier.png")
    log(f"report: {out / 'frontier.json'}, frontier.md" + (", frontier.png" if png else ""))


# -- the run --------------------------------------------------------------------------------------
def pick_compiled(points: list[dict[str, Any]], limit: int) -> list[tuple[int, int, str, int]]:
    """The configurations worth compiling: best within 1% and 5%, then the Pareto front."""
    snlp = [p for p in points if p["kind"] == "snlp" and p["speedup"] is not None]
    order: list[dict[str, Any]] = []
    for bound in (0.01, 0.02, 0.05, 0.10):
        ok = [p for p in snlp if p["ppl_vs_baseline"] <= bound]
        if ok:
            order.append(max(ok, key=lambda p: p["speedup"]))
    order += pareto(snlp)
    configs = list(
        dict.fromkeys((p["parallel_layers"], p["iterations"], p["init"], fusion_of(p)) for p in order)
    )
    return configs[:limit]


def parse_point(text: str) -> tuple[int, int, str, int]:
    """'8:2:h0' -> (8, 2, 'h0', 1), '16:2:h0:f4' -> (16, 2, 'h0', 4): parallel layers, iterations,
    init and fusion (wide layers of M; 1, the default, is none)."""
    try:
        par, k, init, *rest = text.split(":")
        if init not in ("h0", "warm") or len(rest) > 1 or (rest and not rest[0].startswith("f")):
            raise ValueError
        fusion = int(rest[0][1:]) if rest else 1
        if fusion < 1:
            raise ValueError
        return int(par), int(k), init, fusion
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a point is PAR:K:INIT[:fM] with INIT h0 or warm and M the wide layers' size, e.g. 8:2:h0 "
            f"or 16:2:h0:f4; got {text!r}"
        ) from None


def run(args: argparse.Namespace) -> int:
    scale = scale_of(args)
    if args.steps:
        scale = Scale(**{**asdict(scale), "steps": args.steps})
    if args.device:
        dtype = "bf16" if args.device.startswith("cuda") else "fp32"
        scale = Scale(**{**asdict(scale), "device": args.device, "dtype": dtype})
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    left = lambda: args.budget_min * 60 - (time.perf_counter() - t_start)  # noqa: E731
    device = torch.device(scale.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("frontier: this run needs a CUDA GPU (use --smoke for the CPU check)")
    meta: dict[str, Any] = {
        "env": environment(device),
        "command": "python -m benchmarks frontier "
        + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "scale": asdict(scale),
        "scale_note": (
            f"nanochat L={scale.n_layer}, d={scale.n_embd}, BPE vocab {scale.vocab}, trained at T={scale.seq_len}; "
            f"decode timed at batch 1, context {scale.context}, {scale.dtype}; perplexity of the cached decode "
            f"step, teacher-forced over {scale.eval_windows} held-out windows of {scale.seq_len} tokens."
        ),
    }
    snlp_options: dict[str, Any] = {}
    if device.type == "cuda":
        meta["inductor"] = inductor_options(BEST_INDUCTOR)
        snlp_options = parse_inductor_options(SNLP_INDUCTOR, "--snlp-inductor")
        torch._dynamo.config.cache_size_limit = 256
    chosen = [v for v in variants(scale) if not args.models or v.name in args.models]
    stages = set(args.stages.split(","))
    if args.quality_from:  # a speed-only run over an earlier run's quality
        quality, trained = quality_from(Path(args.quality_from))
        meta["quality_from"] = args.quality_from
        stages = {"speed"}
    else:
        corpus, windows, meta["data"] = prepare_data(scale, work)
        (work / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if "train" in stages:
            trained = {v.name: train_variant(v, scale, corpus, work) for v in chosen}
        else:
            trained = {v.name: json.loads((work / f"{v.name}.train.json").read_text()) for v in chosen}
        if "quality" not in stages:
            return 0
        quality = []
        checked = work / "graph_check.json"  # (once per machine: ~100 s of a cold call's 600)
        todo = [v for v in chosen if not (work / f"{v.name}.quality.json").exists()]
        if checked.exists():
            meta["graph_check"] = json.loads(checked.read_text())
        elif device.type == "cuda" and todo:
            meta["graph_check"] = graph_check(work, scale, windows, corpus.val_bytes_per_token)
            checked.write_text(json.dumps(meta["graph_check"]))
        (work / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        for v in chosen:
            quality += measure_quality(v, scale, windows, corpus.val_bytes_per_token, work)
    if "speed" not in stages:
        return 0
    modes = ["eager+graph", "compiled+graph"] if device.type == "cuda" else ["eager"]
    if args.points and device.type == "cuda":
        modes = ["compiled+graph"]  # only the chosen points, in the faster lowering
    grid_mode, point_mode = modes[0], modes[-1]
    timers: list[Timer] = []
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    with torch.no_grad():
        deep = Timer(load_for_inference(work, BASELINE, scale), BASELINE, scale, snlp_options, work)
        timers.append(deep)
        meta["floor_ms"] = deep.floor_ms(bandwidth)
        meta["copy_bandwidth_tbs"] = bandwidth / 1e12
        (work / "meta.json").write_text(json.dumps(meta, indent=1, default=str))  # (assemble reads it)
        deep.sequential(modes)
        for v in chosen:
            if v.n_layer is not None:
                model = load_for_inference(work, v.name, scale, v.n_layer)
                t = Timer(model, v.name, scale, snlp_options, work)
                t.sequential(modes)
                timers.append(t)
        if not args.points:
            deep.grid(timed_parallel(scale, chosen), list(scale.iterations), list(scale.inits), grid_mode)
            whole = [(scale.n_layer, m) for m in scale.fusions]
            deep.fused_grid(whole, list(scale.fused_iterations), grid_mode)
            deep.fused_grid(timed_fused_tails(chosen), list(scale.iterations), grid_mode)
        timed = [r for t in timers for r in t.rows]
        joined = build_points(quality, timed, trained, scale)
        if point_mode != grid_mode or args.points:
            chosen_points = args.points or pick_compiled(joined["points"], args.max_compiled)
            for par, k, init, fusion in chosen_points:
                if left() < 90:
                    log("speed: budget spent, no more compiled points")
                    break
                deep.point(par, k, init, point_mode, fusion)
    timed = [r for t in timers for r in t.rows]
    joined = build_points(quality, timed, trained, scale)
    result = {
        "meta": meta,
        **joined,
        "summary": summarise(joined["points"]),
        "models": trained,
        "timings": [asdict(r) for r in timed],
    }
    write_report(result, out)
    print(markdown(result))
    log(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


def assemble(args: argparse.Namespace) -> int:
    """The frontier from a run's stage results in ``--work`` (checkpoints not needed): the report of a
    run cut short, with what it did not measure listed under ``meta.incomplete``."""
    work = Path(args.work)
    scale = scale_of(args)
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("env", {"gpu": args.device_label, "torch": args.torch_version})
    meta.setdefault("scale", asdict(scale))
    meta.setdefault("scale_note", "(scale as recorded in each model's train.json)")
    meta["command"] = "python -m benchmarks frontier " + " ".join(
        sys.argv[1:] if args.argv is None else args.argv
    )
    names = [v.name for v in variants(scale)]
    trained = {
        n: json.loads((work / f"{n}.train.json").read_text())
        for n in names
        if (work / f"{n}.train.json").exists()
    }
    quality = [
        row
        for n in names
        if (work / f"{n}.quality.json").exists()
        for row in json.loads((work / f"{n}.quality.json").read_text())
    ]
    if args.quality_from:  # (a session that trained only some models: the others as measured before)
        quality, trained = merge_earlier(quality, trained, Path(args.quality_from))
        meta["quality_from"] = args.quality_from
    if args.quality_only:  # (the quality calls' results: a frontier.json for a later --quality-from)
        if (work / "timings.json").exists() or args.log or args.timings_from:
            raise SystemExit("frontier assemble: --quality-only, but there are timings: leave it out")
        timed: list[Timed] = []
        meta["quality_only"] = True
    elif args.timings_from:  # (timing does not depend on the weights: an earlier run's steps)
        if args.log:
            raise SystemExit("frontier assemble: --timings-from or --log, not both")
        timed, timing_meta = timings_from(Path(args.timings_from), scale)
        meta.update(timings_from=args.timings_from, **timing_meta)  # (their floor, not this run's)
    else:
        timed = load_timings(work, Path(args.log) if args.log else None)
    joined = build_points(quality, timed, trained, scale)
    untimed = sorted(
        {
            (p["parallel_layers"], p["iterations"], p["init"], fusion_of(p))
            for p in joined["points"]
            if p["decode_ms"] is None
        },
        key=str,
    )
    compiled = [r for r in timed if r.parallel_layers > 0 and "compiled" in r.variant]
    meta["incomplete"] = {
        "untimed_configs": [list(c) for c in untimed],
        "snlp_compiled_points": len(compiled),
        "note": args.note,
    }
    result = {
        "meta": meta,
        **joined,
        "summary": summarise(joined["points"]),
        "models": trained,
        "timings": [asdict(r) for r in timed],
    }
    write_report(result, Path(args.out))
    print(markdown(result))
    return 0


def calibrate(args: argparse.Namespace) -> int:
    """ms per training step of each objective at the full scale, on random tokens: the device
    schedule's arithmetic (how many steps fit in a call)."""
    from snlp_compile.train import ByteTokenizer, Corpus

    scale = Scale()
    tok = ByteTokenizer()
    tok.vocab_size = scale.vocab  # (random ids: only the size matters)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, scale.vocab, (4_000_000,), generator=g)
    corpus = Corpus(tok, data, data[:200_000], 600_000, 1, 1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Variant("calib-base")
    cases = [
        base,
        Variant("calib-reg", "regulariser"),
        Variant("calib-sft", "snlp-forward", init_from="calib-base", snlp=SNLPConfig(iterations=2)),
        Variant(
            "calib-sft-fused",
            "snlp-forward",
            init_from="calib-base",
            snlp=SNLPConfig(iterations=2, fused_layers=scale.finetune_fusion),
        ),
        replace(tail_variants(scale)[1], name="calib-sft-tail", init_from="calib-base"),
    ]
    for v in cases:
        for steps in (3, 3 + args.steps):
            t = Scale(**{**asdict(scale), "steps": steps, "finetune_steps": steps, "eval_windows": 2})
            name = f"{v.name}-{steps}"
            facts = train_variant(
                replace(v, name=name, init_from=v.init_from and f"{v.init_from}-{steps}"),
                t,
                corpus,
                work,
            )
            if steps == 3:
                first = facts["train_seconds"]
        per_step = (facts["train_seconds"] - first) / args.steps
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        log(
            f"calibrate {v.name}: {1e3 * per_step:.1f} ms/step at {scale.batch} x {scale.seq_len}, peak {mem:.1f} GiB"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    # The deep tails' SNLP-forward fine-tune (sft-tail14) peaks near 70 GB; on an 80 GB H100 the
    # default allocator fragments ~10 GB and runs out. Read when CUDA first allocates, so set here;
    # a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = parser().parse_args(argv)
    args.argv = argv
    if args.command == "report":
        path = Path(args.json)
        result = rejudge(json.loads(path.read_text()))
        write_report(result, path.parent)
        return 0
    if args.command == "assemble":
        return assemble(args)
    if args.command == "calibrate":
        return calibrate(args)
    if args.command == "reference":
        args.out, args.models, args.stages, args.steps = args.work, [BASELINE], "train", None
        args.max_compiled, args.budget_min, args.quality_from, args.points = 0, 1e9, None, None
    return run(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="frontier", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, measure quality and speed, write the frontier")
    r.add_argument("--work", required=True, help="checkpoints and stage results (local disk; resumable)")
    r.add_argument("--out", required=True, help="where frontier.json/.md/.png go")
    r.add_argument(
        "--smoke", action="store_true", help="a tiny run that checks the script (CPU unless --device)"
    )
    r.add_argument(
        "--scale",
        default="gpu",
        choices=sorted(SCALES),
        help="gpu (the frontier), cpu (a recipe study at L=8), cpu16 (the same at L=16), smoke",
    )
    r.add_argument("--device", default=None, help="default: the scale's (gpu: cuda; cpu, smoke: cpu)")
    r.add_argument("--models", nargs="*", default=None, help="only these variants (default: all)")
    r.add_argument(
        "--stages", default="train,quality,speed", help="comma-separated subset of train,quality,speed"
    )
    r.add_argument("--steps", type=int, default=None, help="override the training steps per model")
    r.add_argument(
        "--quality-from",
        default=None,
        help="an earlier frontier.json: time only (random weights where no checkpoint), join its quality",
    )
    r.add_argument("--max-compiled", type=int, default=4, help="frontier points compiled + CUDA graphs")
    r.add_argument("--budget-min", type=float, default=27.0, help="stop compiling points after this")
    r.add_argument(
        "--points",
        nargs="+",
        type=parse_point,
        default=None,
        metavar="PAR:K:INIT[:fM]",
        help="time only these configurations of the baseline, compiled + CUDA graphs (no eager grid), "
        "e.g. 8:2:h0 12:4:warm 16:2:h0:f4 (fM: wide layers of M, fused_layers=M)",
    )
    ref = sub.add_parser("reference", help="retrain the seeded baseline checkpoint only (GPU, a few minutes)")
    ref.add_argument("--work", required=True)
    ref.add_argument("--smoke", action="store_true")
    ref.add_argument("--device", default=None)
    cal = sub.add_parser("calibrate", help="ms per training step of each objective at full scale (GPU)")
    cal.add_argument("--work", required=True)
    cal.add_argument("--steps", type=int, default=10)
    asm = sub.add_parser("assemble", help="the frontier from a run's stage results (a run cut short)")
    asm.add_argument("--work", required=True)
    asm.add_argument("--out", required=True)
    asm.add_argument("--log", default=None, help="the run's log, if it predates work/timings.json")
    asm.add_argument("--note", default="", help="what the run did not reach, for the report")
    asm.add_argument(
        "--timings-from",
        default=None,
        help="an earlier frontier.json: join its timings (same shapes; timing does not depend on the weights)",
    )
    asm.add_argument(
        "--quality-from",
        default=None,
        help="an earlier frontier.json: its quality rows and models for the models this run did not measure",
    )
    asm.add_argument("--smoke", action="store_true", help="a smoke-scale run's stage results")
    asm.add_argument("--scale", default="gpu", choices=sorted(SCALES), help="the run's scale")
    asm.add_argument(
        "--quality-only",
        action="store_true",
        help="no timings yet (the quality calls of a split schedule): every point untimed, for --quality-from",
    )
    asm.add_argument("--device-label", default="?", help="when work/meta.json is missing")
    asm.add_argument("--torch-version", default="?", help="when work/meta.json is missing")
    rep = sub.add_parser(
        "report",
        help="re-judge a frontier.json by the current rules and re-render it with frontier.md and .png",
    )
    rep.add_argument("json")
    return p


if __name__ == "__main__":
    sys.exit(main())
