"""HC Newton against the identity surrogate on mHC models at random initialisation (issue 3).

For each model and seed, the SNLP solve is run with K = 1 .. N iterations twice: with HCN's
surrogate (the n x n stream-mixing matrix H of every layer, as the compiler found it) and with
the skip treated as the identity (IDN's prefix-sum correction on the same batched evaluations).
Reported: the relative error of the solved hidden-state trace (all parallel layers, all streams)
against the sequential model, of the last layer's output, and of the logits. float64, CPU.

A second, smaller table times the correction step alone for static H on CPU: the log-depth scan
against the precomputed prefix products (the default for static H). CPU only, no GPU time was
budgeted for this issue: it shows which variant does less work, not GPU speed.

    python -m benchmarks hcn-convergence [--seeds 3] [--seq 64] [--out DIR]

Writes hcn_convergence.json, hcn_convergence.md and hcn_convergence.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

import snlp_compile
from snlp_compile.models import NanochatConfig, build_model, config_of, model_config
from snlp_compile.models.mhc import HCPackageGPT
from snlp_compile.solve import scan
from snlp_compile.solve.handle import solve_handle
from snlp_compile.solve.solver import identity_surrogate

from . import common

MODELS = {
    "mhc-small (static H)": lambda seed: build_model("mhc-small", seed=seed),
    "mhc-dyn-small (dynamic H)": lambda seed: build_model("mhc-dyn-small", seed=seed),
    "hyper-connections HC (8 layers)": lambda seed: _package(seed, manifold=False),
    "hyper-connections mHC (8 layers)": lambda seed: _package(seed, manifold=True),
}


def _package(seed: int, manifold: bool) -> torch.nn.Module:
    config = model_config("nanochat-small", backout=False)
    assert isinstance(config, NanochatConfig)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HCPackageGPT(config, manifold=manifold).eval()


def sequential_trace(model: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    outs: list[torch.Tensor] = []
    blocks = cast(torch.nn.ModuleList, model.get_submodule("transformer.h"))
    handles = [b.register_forward_hook(lambda _m, _i, out: outs.append(out)) for b in blocks]
    try:
        with torch.no_grad():
            logits = model(idx)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs), logits


def convergence(
    name: str, build: Callable[[int], torch.nn.Module], seed: int, batch: int, seq: int
) -> list[dict[str, Any]]:
    model = build(seed).double()
    idx = torch.randint(
        0, config_of(model).vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)
    )
    fast = snlp_compile.transform(model, (idx,), iterations=1)
    handle = solve_handle(fast)
    trace_seq, logits_seq = sequential_trace(model, idx)
    n = len(trace_seq)
    rows = []
    for surrogate in ("HCN", "identity"):
        for k in range(1, n + 1):
            with (
                torch.no_grad(),
                identity_surrogate(handle.solve) if surrogate == "identity" else nullcontext(),
            ):
                trace = snlp_compile.solve_trace(fast, idx, iterations=k)
                handle.iterations = k
                logits = fast(idx)
                handle.iterations = 1
            rows.append(
                dict(
                    model=name, seed=seed, surrogate=surrogate, k=k, layers=n,
                    trace_err=common.rel_err(trace, trace_seq), last_err=common.rel_err(trace[-1], trace_seq[-1]),
                    logits_err=common.rel_err(logits, logits_seq),
                )
            )  # fmt: skip
    return rows


def time_correction(n_layers: int, batch: int, seq: int, dim: int, reps: int) -> list[dict[str, Any]]:
    """Median time of the static-H correction step (float32, CPU): scan vs prefix products."""
    gen = torch.Generator().manual_seed(0)
    a = 0.8 * torch.eye(4) + 0.1 * torch.randn(n_layers, 4, 4, generator=gen)
    d = torch.randn(n_layers, batch, seq, 4, dim, generator=gen)
    h0 = torch.randn(batch, seq, 4, dim, generator=gen)
    T, P = scan.static_prefix_products(a, matrix=True), scan.static_init_products(a, matrix=True)
    variants = {
        "log-depth scan": lambda: scan.matrix_affine_scan(a, d, h0),
        "prefix products": lambda: scan.apply_prefix_products(T, d, h0, True, P),
    }
    ref = variants["log-depth scan"]()
    out = []
    for label, fn in variants.items():
        err = common.rel_err(fn(), ref)
        t = common.time_fn(fn, torch.device("cpu"), warmup=3, samples=reps)
        out.append(
            dict(
                variant=label, layers=n_layers, shape=f"B={batch} T={seq} n=4 D={dim}", median_ms=t.median_ms,
                p10_ms=t.p10_ms, bytes_moved_floor_mb=2 * d.numel() * 4 / 2**20, rel_diff=err,
            )
        )  # fmt: skip
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over seeds per (model, surrogate, k)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["surrogate"], r["k"]), []).append(r)
    out = []
    for (model, surrogate, k), rs in groups.items():
        out.append(
            dict(
                model=model, surrogate=surrogate, k=k,
                **{key: statistics.median(r[key] for r in rs) for key in ("trace_err", "last_err", "logits_err")},
            )
        )  # fmt: skip
    return out


def markdown(summary: list[dict[str, Any]], timing: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# HCN vs identity surrogate on mHC models at random initialisation",
        "",
        f"float64, CPU, batch {meta['batch']}, T = {meta['seq']}, median over {meta['seeds']} seeds; relative "
        "errors against the sequential model. `trace` = all parallel layers' outputs (all streams), "
        "`last` = the last layer's output, `logits` = after the stream sum, final norm and head.",
        "",
    ]
    index = {(r["model"], r["surrogate"], r["k"]): r for r in summary}
    cells = []
    for model in dict.fromkeys(r["model"] for r in summary):
        for k in sorted({r["k"] for r in summary if r["model"] == model}):
            h, i = index[(model, "HCN", k)], index[(model, "identity", k)]
            errs = [f"{x[e]:.2e}" for e in ("trace_err", "last_err", "logits_err") for x in (h, i)]
            cells.append([model, k, *errs])
    header = "model,K,trace HCN,trace identity,last HCN,last identity,logits HCN,logits identity"
    lines += common.md_table(header.split(","), cells)
    lines += [
        "",
        "How to read it: docs/benchmark-history.md (HC-Newton against the identity surrogate).",
        "",
        "## Correction step alone, static H (CPU, float32)",
        "",
        f"Median of {meta['reps']} runs after warm-up; CPU only (no GPU time was budgeted for this issue). "
        "The floor is the bytes of d read once and the trace written once.",
        "",
    ]
    header = "variant,layers,shape,median ms,p10 ms,bytes floor (MiB),rel. diff to scan"
    specs = (
        "variant:",
        "layers:",
        "shape:",
        "median_ms:.2f",
        "p10_ms:.2f",
        "bytes_moved_floor_mb:.0f",
        "rel_diff:.1e",
    )
    cells = [[format(t[k], f) for k, f in (s.split(":") for s in specs)] for t in timing]
    lines += common.md_table(header.split(","), cells)
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(r["model"] for r in summary))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for surrogate, style in (("HCN", "-o"), ("identity", "--s")):
            rs = sorted(
                (r for r in summary if r["model"] == model and r["surrogate"] == surrogate),
                key=lambda r: r["k"],
            )
            ks = [r["k"] for r in rs]
            ax.semilogy(ks, [max(r["trace_err"], 1e-17) for r in rs], style, label=f"{surrogate}: trace")
            ax.semilogy(
                ks, [max(r["logits_err"], 1e-17) for r in rs], style, alpha=0.45, label=f"{surrogate}: logits"
            )
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("iterations K")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # K is a count
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative error vs sequential")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None, help=common.OUT_HELP)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    out = common.out_dir_from(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    jobs = [(name, build, seed) for name, build in MODELS.items() for seed in range(args.seeds)]
    for name, build, seed in tqdm(jobs, desc="models x seeds"):
        rows.extend(convergence(name, build, seed, args.batch, args.seq))
    summary = summarise(rows)
    timing = []
    for n_layers in tqdm((8, 20, 32), desc="correction timing"):
        timing.extend(time_correction(n_layers, batch=1, seq=256, dim=256, reps=args.reps))

    meta = dict(
        batch=args.batch,
        seq=args.seq,
        seeds=args.seeds,
        reps=args.reps,
        env=common.environment(torch.device("cpu")),
    )
    (out / "hcn_convergence.json").write_text(
        json.dumps(dict(meta=meta, summary=summary, rows=rows, timing=timing), indent=1)
    )
    table = markdown(summary, timing, meta)
    (out / "hcn_convergence.md").write_text(table)
    plot(summary, out / "hcn_convergence.png")
    print(table)
    print(f"wrote {out / 'hcn_convergence.json'}, .md, .png")
    return 0
