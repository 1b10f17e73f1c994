"""Lossless self-speculative decoding (issue 23): tokens/s of greedy generation against the best
sequential decode of the same run, on the frontier's seeded reference checkpoint (trained here) and
on random weights of the same shape (the cost model: acceptance near 0).

    python -m benchmarks speculative --out $OUT --no-random        # a GPU: trains (~3 min), ~8 min in all
    python -m benchmarks speculative --checkpoint base-s0.safetensors --out DIR   # no training
    python -m benchmarks speculative --smoke --out /tmp/spec       # CPU: checks the script (seconds)
    python -m benchmarks speculative --report OUT/speculative.json  # table and plot from a JSON

One process: (1) the frontier's data and its reference checkpoint ``base-s0`` (``frontier.prepare_data``,
``frontier.train_variant``, the paper's recipe, seeded; ``--checkpoint`` loads one instead); (2) at
batch 1, a held-out prompt of ``--prompt`` tokens, ``--new`` new tokens (greedy, bf16 on a GPU):
- sequential decode: the model's cached step and the compiler's exact sequential lowering (K = 1,
  one stage per layer), eager + CUDA graph and compiled + CUDA graph (the step, its cache write and
  the argmax in one graph, no host synchronisation), the best of them the baseline;
- the drafts, one per P in ``--parallel`` and K in ``--ks``: the step transformed with ``--init`` and
  stages (1,) * (L - P) + (P,) (the first L - P layers one after another through the
  batched lowering, the last P layer-parallel at K; P = L: the plain solve); plain SNLP decode
  with each (approximate: its tokens differ);
- speculative decode, P x γ x K: ``Decoder(model, speculative=draft, block_size=γ, cuda_graphs=True,
  verifier=V)`` with the compiled draft and verifier steps (``--no-graphs``: without CUDA graphs; a
  row whose graphs fail is measured again without them, labelled); ``--verifier``: "exact-seq"
  (default: the library's exact sequential lowering of the γ + 1-token step, a transform and a
  compile per γ), "sequential" (the step as written) or "both"; ``--adaptive``: also adaptive block
  sizes up to the largest γ (a verifier compile per size);
(3) the same on random weights, copied into the same tensors (no recompilation, checked against a
fresh transform of the random model). Decode time excludes the prefill. The cost model per row:
draft step and verify (γ + 1 tokens) timed alone (median of CUDA-event samples), the acceptance
a 2x speed-up needs given the measured round time, and the speed-up the measured acceptance gives
under i.i.d. acceptance, E = (1 - a^(γ+1)) / (1 - a) tokens per round.

Writes NAME.json, NAME.md and NAME.png (speed-up against γ) to --out ($OUT, benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import snlp_compile
from snlp_compile.cuda_graph import capture
from snlp_compile.decoding import Decoder, generate
from snlp_compile.models import build_model, config_of
from snlp_compile.models.kv import CachedStep, max_positions, new_cache, write_cache
from snlp_compile.solve.handle import SolveHandle
from snlp_compile.speculative_graphs import GraphedSteps
from snlp_compile.train import load_checkpoint, read_checkpoint_info

from . import frontier
from .common import (
    BEST_INDUCTOR,
    OUT_HELP,
    SMOKE_OUT_HELP,
    SNLP_INDUCTOR,
    compile_module,
    environment,
    fmt,
    inductor_options,
    md_table,
    out_dir_from,
    parse_inductor_options,
    profile_variant,
    pyplot,
    time_fn,
    with_iterations,
)
from .decode import step_inputs
from .frontier import BASELINE, SMOKE, Scale, log

Step = Callable[..., Any]


# -- the arithmetic -------------------------------------------------------------------------------
def tokens_per_round(alpha: float, gamma: int) -> float:
    """Expected tokens per verification with i.i.d. per-token acceptance ``alpha``:
    1 + a + ... + a^γ (the accepted prefix plus the verifier's token)."""
    return float(gamma + 1) if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def acceptance_needed(target: float, gamma: int, round_ms: float, seq_ms: float) -> float | None:
    """The per-token acceptance at which rounds of ``round_ms`` reach ``target`` x a sequential
    decode of ``seq_ms`` per token; None where even full acceptance does not (γ + 1 tokens per
    round are too few)."""
    need = target * round_ms / seq_ms  # tokens per round
    if need > gamma + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_round(mid, gamma) < need else (lo, mid)
    return hi


def ceiling_any_gamma(draft_cost_vs_seq_token: float) -> float:
    """The speed-up no block size exceeds even with every draft accepted: a round of γ drafts and
    one verification emits γ + 1 tokens, so as γ grows each token costs at least one draft step
    (the verification's share vanishes). 2x therefore needs a draft step under half a sequential
    token, whatever the acceptance."""
    return 1.0 / draft_cost_vs_seq_token


# -- the steps ------------------------------------------------------------------------------------
class Steps:
    """Every step the run times, built (and compiled) once for the model's tensors: the random
    weights are copied into the same tensors later (``load_weights``), so nothing recompiles."""

    def __init__(
        self,
        model: torch.nn.Module,
        ks: list[int],
        parallel: list[int],
        max_len: int,
        compiled: bool,
        snlp_options: dict,
        init: str = "warm",
    ):
        self.model, self.compiled, self.init = model, compiled, init
        device = next(model.parameters()).device
        inputs = step_inputs(model, 1, max_len, config_of(model).vocab_size, device)
        self.eager_step = CachedStep(model)
        n = config_of(model).n_layer
        self.exact = (
            snlp_compile.transform(CachedStep(model), inputs, iterations=1, stages=n) if n > 1 else None
        )
        self.draft_bases = {
            p: snlp_compile.transform(
                CachedStep(model), inputs, iterations=1, init=init, stages=draft_stages(n, p)
            )
            for p in parallel
        }
        drafts = {(p, k): with_iterations(b, k, init) for p, b in self.draft_bases.items() for k in ks}
        c = compile_module if compiled else _as_is
        self.seq = c(self.eager_step)
        self.exact_c = None if self.exact is None else c(self.exact)
        self.drafts = {k: c(d, options=snlp_options or None) for k, d in drafts.items()}
        self.verifier = self.seq  # (one compiled step: its one-token code serves the tail as well)
        self.inputs = inputs
        self.c = c
        self.exact_verifiers: dict[int, tuple[torch.nn.Module, Step]] = {}  # t -> (eager, compiled)

    def exact_verifier(self, dec: Decoder, t: int) -> Step:
        """The library's exact-seq verifier on t tokens (``Decoder.verify_step``: the exact
        sequential lowering, K = 1, one layer per stage), compiled where the run compiles; built
        once per t and shared by every decoder (t = 1: the exact-seq baseline's step)."""
        if t == 1 and self.exact is not None and self.exact_c is not None:
            return self.exact_c
        if t not in self.exact_verifiers:
            module = dec.verify_step(t)
            self.exact_verifiers[t] = (module, self.c(module))
        return self.exact_verifiers[t][1]

    def _block_inputs(self, t: int) -> tuple[torch.Tensor, ...]:
        """A block of t tokens that ends at the cache's last position (the one-token inputs' position
        would run t - 1 past it, and past the rotary table of a model run to its full length)."""
        _, pos, k_cache, v_cache = self.inputs
        idx = torch.zeros(1, t, dtype=torch.long, device=pos.device)
        return (idx, torch.full_like(pos, k_cache.size(3) - t), k_cache, v_cache)

    def load_weights(self, other: torch.nn.Module) -> None:
        """Copy ``other``'s weights (same shape) into every step's tensors, in place, and check
        each transformed step against a fresh transform of ``other``."""
        copy_tensors(self.model, other)
        n = config_of(other).n_layer
        checks: list[tuple[torch.nn.Module | None, dict[str, Any], tuple[torch.Tensor, ...]]] = [
            (self.exact, {"stages": n}, self.inputs),
            *(
                (b, {"init": self.init, "stages": draft_stages(n, p)}, self.inputs)
                for p, b in self.draft_bases.items()
            ),
            *((m, {"stages": n}, self._block_inputs(t)) for t, (m, _) in self.exact_verifiers.items()),
        ]
        for mine, kwargs, inputs in checks:
            if mine is None:
                continue
            fresh = snlp_compile.transform(CachedStep(other), inputs, iterations=1, **kwargs)
            copy_tensors(mine, fresh)
            for m in (mine, fresh):
                handle = SolveHandle.of(m)
                if handle is not None:
                    handle.reset()
            with torch.no_grad():
                a, b = mine(*inputs)[0], fresh(*inputs)[0]
            err = float((a.double() - b.double()).norm() / b.double().norm())
            if not err < 1e-3:  # (equal weights: rounding at most; weights not copied: O(1))
                raise RuntimeError(
                    f"copied weights give other logits than a fresh transform ({kwargs}): {err:.2e}"
                )


def draft_stages(n: int, p: int) -> int | tuple[int, ...]:
    """The stages of a draft with the last ``p`` of ``n`` layers layer-parallel: the first n - p
    one after another (stages of one layer, exact at any K), then one stage of p."""
    return 1 if p == n else (1,) * (n - p) + (p,)


def _as_is(fn: Step, options: dict[str, Any] | None = None) -> Step:
    return fn


def copy_tensors(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst's parameters and buffers (the warm-start trace and deferred state excepted) := src's, in
    place; a name or shape missing on either side is an error."""
    skip = ("warm_trace", "deferred")

    def tensors(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        named: dict[str, torch.Tensor] = dict(m.named_parameters(remove_duplicate=False))
        named |= dict(m.named_buffers(remove_duplicate=False))
        return {k: v for k, v in named.items() if v is not None and not any(s in k for s in skip)}

    d, s = tensors(dst), tensors(src)
    if d.keys() != s.keys() or any(d[k].shape != s[k].shape for k in d):
        raise RuntimeError(f"models differ: {sorted(set(d) ^ set(s))[:5]} or shapes")
    with torch.no_grad():
        for k, t in d.items():
            t.copy_(s[k])


# -- sequential and plain SNLP decode ---------------------------------------------------------------
class StepLoop:
    """Greedy decode of ``n`` tokens with one step per token (the step, its cache write, the argmax
    and the position increment; with ``graph`` one CUDA graph replay per token, no host
    synchronisation). Prefill by the eager sequential step, not timed."""

    def __init__(self, model: torch.nn.Module, step: Step, prompt: torch.Tensor, n: int, graph: bool):
        self.device = prompt.device
        self.prompt, self.n, self.p = prompt, n, prompt.shape[1]
        self.prefill = CachedStep(model)
        self.step, self.handle = step, SolveHandle.of(step)
        self.k_cache, self.v_cache = new_cache(model, 1, self.p + n)
        self.idx = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(1, n, dtype=torch.long, device=self.device)
        self.body: Callable[[], Any] = self._body
        if graph:
            self._start()
            self.body = capture(self._body, self.device)

    def _body(self) -> torch.Tensor:
        logits, new_k, new_v = self.step(self.idx, self.pos, self.k_cache, self.v_cache)
        write_cache(self.k_cache, self.v_cache, new_k, new_v, self.pos)
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        self.tokens.index_copy_(1, (self.pos - (self.p - 1)).reshape(1), nxt)
        self.idx.copy_(nxt)
        self.pos += 1
        return nxt

    def _start(self) -> None:
        if self.handle is not None and self.body == self._body:  # (eager: a new sequence; a graph
            self.handle.reset()  # keeps its trace buffer, the first step warm-starts from it)
        with torch.no_grad():
            logits, new_k, new_v = self.prefill(self.prompt, self.pos.zero_(), self.k_cache, self.v_cache)
            write_cache(self.k_cache, self.v_cache, new_k, new_v, self.pos)
            first = logits[:, -1].argmax(dim=-1, keepdim=True)
        self.tokens[:, :1] = first
        self.idx.copy_(first)
        self.pos.fill_(self.p)

    def run(self) -> tuple[torch.Tensor, float]:
        """(prompt + tokens, decode seconds)."""
        self._start()
        with torch.no_grad():
            t0 = _mark(self.device)
            for _ in range(self.n - 1):
                self.body()
            t1 = _mark(self.device)
        return torch.cat([self.prompt, self.tokens], dim=1), _seconds(t0, t1)


def _mark(device: torch.device) -> Any:
    if device.type == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def _seconds(a: Any, b: Any) -> float:
    if isinstance(a, float):
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1e3


# -- the run --------------------------------------------------------------------------------------
def agreement(tokens: torch.Tensor, ref: torch.Tensor, p: int) -> dict[str, Any]:
    """Where the new tokens first differ from ``ref``'s (None: never) and the fraction equal."""
    a, b = tokens[0, p:].cpu(), ref[0, p:].cpu()
    diff = (a != b).nonzero()
    return {
        "first_mismatch": None if diff.numel() == 0 else int(diff[0]),
        "match_fraction": float((a == b).float().mean()),
    }


class Run:
    """The rows of one run; every row is written as it is measured."""

    def __init__(
        self, args: argparse.Namespace, prompt: torch.Tensor, meta: dict[str, Any], out: Path, t_start: float
    ):
        self.args, self.prompt, self.meta, self.out = args, prompt, meta, out
        self.rows: list[dict[str, Any]] = []
        self.t_start = t_start
        self.deadline = args.budget_s  # (seconds after t_start; the trained pass may get less)
        self.decoders: dict[tuple[int, int, int, bool, bool, str], Decoder] = {}
        self.device = prompt.device

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - self.t_start)

    def add(self, row: dict[str, Any], measure: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.left() < 0:
            share = " (the trained rows' part; --random-share)" if self.deadline < self.args.budget_s else ""
            row["error"] = f"skipped: --budget-s spent{share}"
        else:
            try:
                measure(row)
            except Exception as exc:  # one variant failing must not lose the run
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        row["build_and_time_s"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        tps = f"{row['tokens_per_s']:.1f} tokens/s" if row.get("tokens_per_s") else row.get("error")
        extra = "" if row.get("acceptance_rate") is None else f", acceptance {row['acceptance_rate']:.3f}"
        log(f"{row['weights']} {row['variant']}: {tps}{extra} ({row['build_and_time_s']} s)")
        write_report(self.result(), self.out, self.args.name, with_plot=False)
        return row

    def repeat(self, once: Callable[[], tuple[torch.Tensor, float, Any]]) -> tuple[torch.Tensor, float, Any]:
        """Warm-up call(s), then the median decode time of --repeats calls (with its tokens/extra)."""
        for _ in range(self.args.warmup):
            once()
        runs = sorted((once() for _ in range(self.args.repeats)), key=lambda r: r[1])
        return runs[len(runs) // 2]

    def loop(
        self, weights: str, kind: str, variant: str, step: Step, graph: bool, k: int | None = None
    ) -> None:
        def measure(row: dict[str, Any]) -> None:
            loop = StepLoop(self.steps.model, step, self.prompt, self.args.new, graph)
            tokens, seconds, _ = self.repeat(lambda: (*loop.run(), None))
            row.update(decode_ms=1e3 * seconds, tokens_per_s=(self.args.new - 1) / seconds)
            row["tokens"], row["ms_per_token"] = tokens, 1e3 * seconds / (self.args.new - 1)

        self.add({"weights": weights, "kind": kind, "variant": variant, "k": k, "gamma": None}, measure)

    def speculative(
        self, weights: str, p: int, k: int, gamma: int, graphs: bool, verifier: str, adaptive: bool = False
    ) -> None:
        init = self.steps.init
        name = f"speculative P={p} K={k} {init} γ{'<=' if adaptive else '='}{gamma}" + (
            " graphs" if graphs else ""
        )
        name += " adaptive" if adaptive else ""
        name += f" {verifier}-verifier"

        def measure(row: dict[str, Any]) -> None:
            key = (p, k, gamma, graphs, adaptive, verifier)
            if key not in self.decoders:  # (built once: the random weights reuse its graphs)
                capture = graphs and self.device.type == "cuda"
                dec = Decoder(
                    self.steps.model, batch=1, max_len=self.prompt.shape[1] + self.args.new,
                    speculative=self.steps.drafts[p, k], block_size=gamma, cuda_graphs=capture,
                    adaptive_block_size=adaptive, verifier=verifier,  # type: ignore[arg-type]
                )  # fmt: skip
                dec.sequential = self.steps.verifier  # (the compiled verifier; the prefill stays eager)
                if verifier == "exact-seq":  # (the compiled ones, shared: the lengths rounds verify)
                    sizes = range(1, gamma + 2) if adaptive or not graphs else (1, gamma + 1)
                    for t in sizes:
                        dec.verify_steps[t] = self.steps.exact_verifier(dec, t)
                if graphs and not capture:  # (--uncaptured-graphs: the graphed code, eagerly)
                    blocks = list(range(1, gamma + 1)) if adaptive else [gamma]
                    kc, vc = dec.k_cache, dec.v_cache
                    dec.graphed = GraphedSteps(dec.draft_step, dec.verify_step, blocks, kc, vc, capture=False)
                    dec.cuda_graphs = True
                self.decoders[key] = dec
            dec = self.decoders[key]

            def once() -> tuple[torch.Tensor, float, Any]:
                tokens, stats = generate(dec, self.prompt, self.args.new, return_stats=True)
                assert stats is not None
                return tokens, stats.decode_time_s, stats

            tokens, seconds, stats = self.repeat(once)
            row.update(decode_ms=1e3 * seconds, tokens_per_s=stats.emitted / seconds, tokens=tokens)
            row.update(stats=stats.as_dict(), acceptance_rate=stats.acceptance_rate)
            row["tokens_per_verify"] = stats.tokens_per_verify
            full = stats.drafted // gamma  # (rounds with a whole block; the rest one token each)
            row["full_rounds"], row["single_steps"] = full, stats.rounds - full
            row["draft_ms_per_step"] = 1e3 * stats.draft_time_s / max(stats.drafted, 1)
            row["verify_ms_per_round"] = 1e3 * stats.verify_time_s / max(stats.rounds, 1)
            row.update(self.components(dec, gamma))

        row: dict[str, Any] = {
            "weights": weights,
            "kind": "speculative",
            "variant": name,
            "k": k,
            "gamma": gamma,
        }
        row["parallel"], row["verifier"], row["init"] = p, verifier, init
        row["graphs"], row["adaptive"] = graphs, adaptive
        self.add(row, measure)
        if graphs and row.get("error") and not row["error"].startswith("skipped"):
            log(f"{weights} {name} failed with CUDA graphs: the same row without them follows")
            self.speculative(weights, p, k, gamma, False, verifier, adaptive)

    def components(self, dec: Decoder, gamma: int) -> dict[str, float]:
        """Median time of the γ draft steps of a round (with graphs: the block's one replay) and
        of one verification of γ + 1 tokens, each alone; draft_step_ms is the block's time / γ."""
        g = dec.graphed
        pos = torch.tensor(self.prompt.shape[1], device=self.device)
        one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        block = torch.zeros(1, gamma + 1, dtype=torch.long, device=self.device)
        kc, vc = dec.k_cache, dec.v_cache
        if g is not None:
            draft_block: Callable[[], Any] = lambda: g.blocks[gamma](one[:, 0], pos)  # noqa: E731
            verify: Callable[[], Any] = lambda: g.verify[gamma](block, pos, kc, vc)  # noqa: E731
        else:
            draft = dec.draft_step
            assert draft is not None  # (a speculative decoder's)

            def draft_block() -> None:
                for i in range(gamma):
                    draft(one, pos + i, kc, vc)

            verify = lambda: dec.verify_step(gamma + 1)(block, pos, kc, vc)  # noqa: E731
        n = self.args.samples
        with torch.no_grad():
            d = time_fn(draft_block, self.device, warmup=3, samples=n)
            v = time_fn(verify, self.device, warmup=3, samples=n)
            if self.args.profile and self.device.type == "cuda":  # (where a verification's time goes)
                path = self.out / f"{self.args.name}_profile.txt"
                profile_variant(verify, f"verify, {gamma + 1} tokens ({dec.verifier} verifier)", path)
                profile_variant(draft_block, f"draft block of {gamma}", path)
        return {"draft_block_ms": d.median_ms, "draft_step_ms": d.median_ms / gamma, "verify_ms": v.median_ms}

    def measure_all(self, weights: str, steps: Steps) -> None:
        """The rows of one set of weights, the baseline and the speculative rows first (each row
        compiles what it first calls; rows past --budget-s are skipped, not lost)."""
        self.steps = steps
        graph = self.device.type == "cuda"
        graphs = (graph or self.args.uncaptured_graphs) and not self.args.no_graphs
        fast = "compiled+graph" if steps.compiled else ("eager+graph" if graph else "eager")
        self.loop(weights, "sequential", f"seq {fast}", steps.seq, graph)
        if steps.exact_c is not None:  # (compiled or not: there whenever steps.exact is)
            self.loop(weights, "sequential", f"exact-seq {fast}", steps.exact_c, graph)
        verifiers = ["exact-seq", "sequential"] if self.args.verifier == "both" else [self.args.verifier]
        for verifier in verifiers:  # (exact-seq: a transform and a compile per γ)
            for p in self.args.parallel:
                for gamma in self.args.gammas:
                    for k in self.args.ks:
                        self.speculative(weights, p, k, gamma, graphs, verifier)
        if self.args.adaptive:  # (with graphs: a verifier graph, and a compile, per block size)
            for p in self.args.parallel:
                for k in self.args.ks:
                    self.speculative(weights, p, k, max(self.args.gammas), graphs, verifiers[0], True)
        for p in self.args.parallel:
            for k in self.args.ks:
                name = f"snlp P={p} K={k} {steps.init} {fast}"
                self.loop(weights, "snlp", name, steps.drafts[p, k], graph, k)
        if steps.compiled:  # (the uncompiled steps, captured)
            self.loop(weights, "sequential", "seq eager+graph", steps.eager_step, graph)
            if steps.exact is not None:
                self.loop(weights, "sequential", "exact-seq eager+graph", steps.exact, graph)

    def result(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": finish(self.rows, self.prompt.shape[1])}


def finish(rows: list[dict[str, Any]], p: int) -> list[dict[str, Any]]:
    """Ratios against each weights' best sequential decode, token agreement with it, the arithmetic."""
    done = []
    for weights in dict.fromkeys(r["weights"] for r in rows):
        mine = [r for r in rows if r["weights"] == weights]
        seq = [r for r in mine if r["kind"] == "sequential" and r.get("tokens_per_s")]
        best = max(seq, key=lambda r: r["tokens_per_s"]) if seq else None
        for r in mine:
            out = {k: v for k, v in r.items() if k != "tokens"}
            if best is not None and r.get("tokens_per_s"):
                out["best_seq_variant"] = best["variant"]
                out["speedup_vs_best_seq"] = r["tokens_per_s"] / best["tokens_per_s"]
                out.update(agreement(r["tokens"], best["tokens"], p))
                if r["kind"] == "speculative" and not r.get("adaptive"):
                    out.update(arithmetic(r, best))
            done.append(out)
    return done


def arithmetic(r: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """The cost model of a speculative row against the best sequential per-token time."""
    gamma, seq_ms = r["gamma"], 1e3 / best["tokens_per_s"]
    full, singles = r["full_rounds"], r["single_steps"]
    # a whole round: decode time less the one-token tail (at the sequential rate), per full round
    round_ms = (r["decode_ms"] - singles * seq_ms) / full if full else math.nan
    parts_ms = gamma * r["draft_step_ms"] + r["verify_ms"]
    alpha = r["acceptance_rate"]
    ok = not math.isnan(round_ms)
    return {
        "seq_ms_per_token": seq_ms,
        "round_ms": round_ms,
        "round_ms_from_parts": parts_ms,
        "verify_cost_vs_seq_token": r["verify_ms"] / seq_ms,
        "draft_cost_vs_seq_token": r["draft_step_ms"] / seq_ms,
        "acceptance_needed_2x": acceptance_needed(2.0, gamma, round_ms, seq_ms) if ok else None,
        "acceptance_needed_2x_parts": acceptance_needed(2.0, gamma, parts_ms, seq_ms),
        "speedup_at_measured_acceptance": tokens_per_round(alpha, gamma) * seq_ms / round_ms if ok else None,
        "speedup_at_full_acceptance": (gamma + 1) * seq_ms / round_ms if ok else None,
    }


# -- report ---------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [
        "## Speculative decoding: SNLP drafts, an exact step verifies (lossless)",
        "",
        f"Device: {meta['env'].get('gpu') or meta['env'].get('cpu')}, torch {meta['env']['torch']}. {meta['note']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        *summary(rows),
    ]
    if meta.get("random_weights_error"):
        lines += [f"Random weights not measured: {meta['random_weights_error']}", ""]
    header = ["weights", "variant", "tokens/s", "speed-up", "acceptance", "tokens/verify", "draft ms",
              "verify ms", "verify / seq token", "accept. for 2x", "first mismatch", "error"]  # fmt: skip
    cells = []
    for r in rows:
        need = r.get("acceptance_needed_2x", "")
        cells.append([
            r["weights"], r["variant"], fmt(r.get("tokens_per_s"), ".1f"), fmt(r.get("speedup_vs_best_seq"), ".2f"),
            fmt(r.get("acceptance_rate")), fmt(r.get("tokens_per_verify"), ".2f"), fmt(r.get("draft_step_ms"), ".4f"),
            fmt(r.get("verify_ms"), ".4f"), fmt(r.get("verify_cost_vs_seq_token"), ".2f"),
            "unreachable" if need is None else fmt(need) if need != "" else "",
            "" if r.get("first_mismatch") is None else r["first_mismatch"], r.get("error") or "",
        ])  # fmt: skip
    lines += md_table(header, cells)
    lines += [
        "",
        "speed-up: against the best sequential decode of the same weights (the variant in the JSON). "
        "acceptance for 2x: the per-token acceptance (i.i.d.) at which this row's measured round time "
        "gives 2x; unreachable: not even with every draft accepted. first mismatch: the first new token "
        "that differs from the best sequential decode's (bf16: the verifier's γ+1-token step may round "
        "differently from the one-token step; empty: none).",
    ]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The goal's verdict: the fastest lossless row on the trained weights against 2x, with the
    arithmetic that explains it (fixed block sizes; an adaptive row, where faster, is named)."""
    spec = [
        r
        for r in rows
        if r["weights"] == "trained" and r["kind"] == "speculative" and r.get("speedup_vs_best_seq")
    ]
    fixed = [r for r in spec if "seq_ms_per_token" in r]
    if not fixed:
        return ["No speculative row on the trained weights was measured.", ""]
    b = max(fixed, key=lambda r: r["speedup_vs_best_seq"])
    best = max(spec, key=lambda r: r["speedup_vs_best_seq"])
    need = b.get("acceptance_needed_2x")
    verdict = "met" if best["speedup_vs_best_seq"] >= 2.0 else "missed"
    round_ms = b.get("round_ms")
    rounds = (
        ""
        if round_ms is None or math.isnan(round_ms)
        else f" = {round_ms / b['seq_ms_per_token']:.2f} sequential tokens"
    )
    lines = [
        f"**Goal >= 2.0x lossless: {verdict}.** Best fixed block: {b['variant']}, {b['speedup_vs_best_seq']:.2f}x "
        f"over {b['best_seq_variant']} ({b['tokens_per_s']:.0f} tokens/s); acceptance {b['acceptance_rate']:.3f}, "
        f"{b['tokens_per_verify']:.2f} tokens per verification; a round costs {fmt(round_ms, '.3f')} ms{rounds} "
        f"(draft step {b['draft_cost_vs_seq_token']:.2f}, verification {b['verify_cost_vs_seq_token']:.2f} of one "
        f"sequential token); 2x needs acceptance {'above 1 (unreachable at this γ)' if need is None else format(need, '.3f')}."
    ]
    if best is not b:
        lines.append(f"Faster: {best['variant']}, {best['speedup_vs_best_seq']:.2f}x.")
    cheapest: dict[int, float] = {}
    for r in fixed:
        if r.get("draft_cost_vs_seq_token"):
            cheapest[r["k"]] = min(cheapest.get(r["k"], math.inf), r["draft_cost_vs_seq_token"])
    if cheapest:
        bounds = ", ".join(
            f"K={k} {ceiling_any_gamma(c):.2f}x (draft step {c:.2f})" for k, c in sorted(cheapest.items())
        )
        lines.append(
            f"Ceiling at any γ with every draft accepted (1 / the draft step in sequential tokens): {bounds}; "
            "2x needs a draft step under 0.5 of a sequential token."
        )
    return [" ".join(lines), ""]


def plot(result: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    spec = [r for r in result["rows"] if r["kind"] == "speculative" and r.get("speedup_vs_best_seq")]
    for weights, style in (("trained", "-o"), ("random", "--x")):
        for p, k, v in sorted({(r["parallel"], r["k"], r["verifier"]) for r in spec}):
            mine = [
                r
                for r in spec
                if r["weights"] == weights and (r["parallel"], r["k"], r["verifier"]) == (p, k, v)
            ]
            pts = sorted((r["gamma"], r["speedup_vs_best_seq"]) for r in mine if not r.get("adaptive"))
            if pts:
                label = f"{weights}, draft P={p} K={k}, {v} verifier"
                line = ax.plot(*zip(*pts), style, label=label)[0]
                costs = [r["draft_cost_vs_seq_token"] for r in mine if r.get("draft_cost_vs_seq_token")]
                if weights == "trained" and costs:  # (the bound no γ or acceptance passes)
                    ceiling = ceiling_any_gamma(min(costs))
                    ax.axhline(ceiling, color=line.get_color(), lw=0.8, ls="--")
                    ax.annotate(f"K={k} ceiling {ceiling:.2f}x", (0.01, ceiling), xycoords=("axes fraction", "data"),
                                fontsize=7, color=line.get_color(), va="bottom")  # fmt: skip
                for r in (r for r in mine if r.get("adaptive")):
                    ax.plot([r["gamma"]], [r["speedup_vs_best_seq"]], "*", ms=11, color=line.get_color())
    if any(r.get("adaptive") for r in spec):
        ax.plot([], [], "*", color="gray", label="adaptive, up to γ")
    gammas = sorted({r["gamma"] for r in spec})
    ax.set_xscale("log", base=2)
    ax.set_xticks(gammas, [str(g) for g in gammas], minor=False)
    ax.minorticks_off()
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(2.0, color="green", lw=0.8, ls=":", label="goal 2x")
    ax.set_xlabel("block size γ (drafted tokens per verification)")
    ax.set_ylabel("tokens/s over the best sequential decode")
    ax.legend(fontsize=8)
    ax.set_title(f"Speculative decoding, {result['meta']['env'].get('gpu') or 'CPU'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], out: Path, name: str, with_plot: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown(result))
    if with_plot:
        plot(result, out / f"{name}.png")


# -- main -----------------------------------------------------------------------------------------
def trained_deadline(elapsed_s: float, budget_s: float, random_share: float) -> float:
    """When the trained weights' rows stop (seconds from the start): ``random_share`` of the budget
    left once the model is ready is kept for the random weights' rows, which reuse the steps the
    trained rows compiled, so the share buys them more rows than it would the trained pass."""
    return elapsed_s + max(budget_s - elapsed_s, 0.0) * (1.0 - random_share)


def reference_model(args: argparse.Namespace, scale: Scale, corpus: Any, work: Path) -> torch.nn.Module:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[scale.dtype]
    if args.checkpoint:
        recorded = read_checkpoint_info(args.checkpoint).get("tokenizer")
        if recorded is not None and recorded != corpus.tokenizer.to_json():
            raise SystemExit(
                f"speculative: {args.checkpoint} was trained with another tokenizer than the data in "
                f"{work}: give --work the folder of the run that trained it"
            )
        return load_checkpoint(args.checkpoint, device=scale.device).to(dtype).eval()
    frontier.train_variant(frontier.variants(scale)[0], scale, corpus, work)  # base-s0, seeded
    return frontier.load_for_inference(work, BASELINE, scale)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="speculative", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help=OUT_HELP + SMOKE_OUT_HELP)
    p.add_argument("--work", default="/tmp/snlp_speculative", help="data and checkpoint (local disk)")
    p.add_argument("--checkpoint", default=None, help="a trained reference checkpoint: no training")
    p.add_argument("--smoke", action="store_true", help="tiny scale, CPU unless --device")
    p.add_argument("--device", default=None, help="default: cuda (the smoke scale: cpu)")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--gammas", default="2,4", type=ints, help="block sizes γ (default 2,4)")
    p.add_argument("--ks", default="1,2", type=ints, help="draft iterations K (default 1,2)")
    init = "the drafts' init: h0 (default: trained models converge better from it, frontier.md) or warm (the last trace)"
    p.add_argument("--init", choices=("warm", "h0"), default="h0", help=init)
    staged = "layer-parallel layers P of the drafts, stages (1,) * (L - P) + (P,) (default 8,12; smoke 2,4)"
    p.add_argument("--parallel", default=None, type=ints, help=staged)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; smoke 8)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 256; smoke 24)")
    p.add_argument("--repeats", type=int, default=None, help="timed generations per row (default 5; smoke 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed generations per row first")
    p.add_argument("--samples", type=int, default=None, help="CUDA-event samples per component timing")
    p.add_argument("--no-random", action="store_true", help="skip the random-weights run")
    share = "the share of the budget left once the model is ready that the random weights' rows keep (default 0.3)"
    p.add_argument("--random-share", type=float, default=0.3, help=share)
    p.add_argument("--no-graphs", action="store_true", help="speculative steps without CUDA graphs")
    uncaptured = "CPU check: speculative rows through the graphed code path, run eagerly (no capture)"
    p.add_argument("--uncaptured-graphs", action="store_true", help=uncaptured)
    p.add_argument("--adaptive", action="store_true", help="also adaptive block sizes up to the largest γ")
    exact = "exact-seq: the compiler's exact sequential lowering of the γ + 1-token step; sequential: the step as written"
    p.add_argument("--verifier", choices=("exact-seq", "sequential", "both"), default="exact-seq", help=exact)
    p.add_argument("--no-compile", action="store_true", help="no torch.compile anywhere")
    spent = "skip rows once this many seconds have passed since the start (training included)"
    p.add_argument("--budget-s", type=float, default=480.0, help=spent)
    p.add_argument("--name", default="speculative", help="stem of the output files")
    prof = (
        "append torch.profiler's kernel table of each row's verification and draft block to NAME_profile.txt"
    )
    p.add_argument("--profile", action="store_true", help=prof)
    p.add_argument(
        "--report", default=None, help="re-render NAME.md and NAME.png from this JSON; run nothing"
    )
    args = p.parse_args(argv)
    if args.report:  # (a run cut short wrote its JSON and table row by row, the plot at the end)
        path = Path(args.report)
        write_report(json.loads(path.read_text()), path.parent, path.stem)
        return 0
    if not 0.0 <= args.random_share < 1.0:
        raise SystemExit(f"speculative: --random-share must lie in [0, 1), got {args.random_share}")
    t_start = time.perf_counter()
    scale = SMOKE if args.smoke else Scale()
    if args.device:
        scale = replace(scale, device=args.device, dtype="bf16" if args.device.startswith("cuda") else "fp32")
    device = torch.device(scale.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("speculative: this run needs a CUDA GPU (use --smoke for the CPU check)")
    if args.profile and device.type != "cuda":
        raise SystemExit("speculative: --profile reads CUDA kernel times: it needs a CUDA device")
    args.prompt = args.prompt or (8 if args.smoke else 128)
    args.new = args.new or (24 if args.smoke else 256)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    args.parallel = args.parallel or ([2, 4] if args.smoke else [8, 12])
    args.samples = args.samples or (5 if device.type == "cpu" else 200)
    if not args.checkpoint and args.prompt + args.new > max(scale.seq_len, scale.context):
        raise SystemExit(
            f"speculative: --prompt + --new exceeds the model's {max(scale.seq_len, scale.context)} positions"
        )
    compiled = device.type == "cuda" and not args.no_compile
    snlp_options: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "env": environment(device),
        "scale": asdict(scale),
        "args": {k: v for k, v in vars(args).items()},
    }
    meta["command"] = "python -m benchmarks speculative " + " ".join(sys.argv[1:] if argv is None else argv)
    if device.type == "cuda":
        meta["inductor"] = inductor_options(BEST_INDUCTOR)
        snlp_options = parse_inductor_options(SNLP_INDUCTOR, "--snlp-inductor")
        torch._dynamo.config.cache_size_limit = 256
    out, work = out_dir_from(args.out, args.smoke), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    corpus, _, meta["data"] = frontier.prepare_data(scale, work)
    model = reference_model(args, scale, corpus, work)
    cfg = config_of(model)
    positions = max_positions(model)  # (a checkpoint: its own, not the scale's)
    if args.prompt + args.new > positions:
        raise SystemExit(f"speculative: --prompt + --new exceeds the model's {positions} positions")
    if not all(1 <= q <= cfg.n_layer for q in args.parallel):
        raise SystemExit(f"speculative: --parallel {args.parallel} must lie in 1..{cfg.n_layer}")
    mid = corpus.val.numel() // 2
    prompt = corpus.val[mid : mid + args.prompt].reshape(1, -1).long().to(device)
    meta["note"] = (
        f"nanochat L={cfg.n_layer}, d={cfg.n_embd}, vocab {cfg.vocab_size}; "
        f"{'trained: ' + (args.checkpoint or 'the frontier reference ' + BASELINE + ', seeded, this run')}; "
        f"batch 1, held-out prompt of {args.prompt} tokens, {args.new} greedy new tokens, {scale.dtype}; "
        f"{'compiled' if compiled else 'eager'} steps; median of {args.repeats} generations after "
        f"{args.warmup}; decode time excludes the prefill."
    )
    run = Run(args, prompt, meta, out, t_start)
    max_len = args.prompt + args.new
    with torch.no_grad():
        what = f"K = {args.ks}, P = {args.parallel}, context {max_len}"
        log(f"steps: transform{' and compile' if compiled else ''} ({what})")
        steps = Steps(model, args.ks, args.parallel, max_len, compiled, snlp_options, args.init)
        if not args.no_random:  # (a run cut short keeps rows of both weights: the cost model too)
            run.deadline = trained_deadline(time.perf_counter() - t_start, args.budget_s, args.random_share)
        run.measure_all("trained", steps)
        run.deadline = args.budget_s
        if not args.no_random:
            overrides = {**scale.overrides(), "vocab_size": cfg.vocab_size, "zero_init_out": False}
            random = build_model(frontier.MODEL, seed=0, device=scale.device, **overrides)
            try:
                steps.load_weights(random.to(next(model.parameters()).dtype).eval())
            except RuntimeError as exc:  # (the trained rows are kept; the report says why)
                meta["random_weights_error"] = str(exc)
                log(f"random weights: {exc}")
            else:
                run.measure_all("random", steps)
            del random
    result = run.result()
    write_report(result, out, args.name)
    print(markdown(result), flush=True)
    log(f"total {time.perf_counter() - run.t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
