"""SNLP-aware training on a GPU: baseline and regularised nanochat-style models on real text, the
same data, seed and token budget, evaluated on held-out text at K = 1, 2, 4 with all layers and with
half of them parallel (issue 5, what must be shown 2 and 3).

Each variant is trained, evaluated and written out (JSON, markdown table, plot) before the next one
starts, so a run cut short still returns what it finished. Results of several runs (e.g. one call
per variant on a lent machine) are combined with --merge.

    python -m benchmarks train-gpu --variants base reg:weight=1.0 --steps 3000 --out $OUT
    python -m benchmarks train-gpu --merge a/train_gpu.json b/train_gpu.json --out benchmarks/results

A variant is ``name`` or ``name:key=value,...`` with keys weight (lambda; absent or 0 = baseline),
sg (stop-gradient on the target, 0/1), suffix (parallel-suffix sizes, e.g. 16/8), every, ramp
(lambda warm-up as a fraction of the steps), lr, iters (the K of the regularised trace, default 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from snlp_compile.train import (
    RegulariserConfig,
    SolveSetting,
    TrainConfig,
    evaluate_model,
    load_corpus,
    markdown_table,
    plot_ppl_vs_k,
    train,
)
from snlp_compile.train.data import eval_windows

from . import common

NAME = "train_gpu"
MODEL = "nanochat-small"
SHAPE = {"n_layer": 16, "n_embd": 512, "n_head": 4, "n_kv_head": 4, "vocab_size": 256, "sequence_len": 512}
TARGET_SEQ = 0.02  # regularised sequential ppl within 2% of the baseline's
TARGET_K2 = 0.05  # regularised K=2 all-parallel ppl within 5% of its own sequential ppl


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    unknown = set(opts) - {"weight", "sg", "suffix", "every", "ramp", "lr", "iters"}
    if unknown:
        raise SystemExit(f"variant {spec!r}: unknown keys {sorted(unknown)}")
    return name, opts


def regulariser_for(opts: dict[str, str], steps: int) -> RegulariserConfig | None:
    weight = float(opts.get("weight", 0))
    if weight == 0:
        return None
    return RegulariserConfig(
        weight=weight,
        stop_gradient=opts.get("sg", "0") == "1",
        suffix_sizes=tuple(int(n) for n in opts["suffix"].split("/")) if "suffix" in opts else None,
        every=int(opts.get("every", 1)),
        ramp_steps=int(float(opts.get("ramp", 0.25)) * steps),
        iterations=int(opts.get("iters", 1)),
    )


def run_variant(spec: str, args: argparse.Namespace, corpus: Any, windows: torch.Tensor) -> dict[str, Any]:
    name, opts = parse_variant(spec)
    reg = regulariser_for(opts, args.steps)
    config = TrainConfig(
        model=args.model, model_overrides=dict(SHAPE), steps=args.steps, batch_size=args.batch_size,
        seq_len=SHAPE["sequence_len"], lr=float(opts.get("lr", args.lr)), warmup_steps=min(args.warmup, args.steps),
        seed=args.seed, device=args.device, regulariser=reg, eval_windows=16,
    )  # fmt: skip
    print(f"== {name}: {spec} ({args.steps} steps x {args.batch_size} x {SHAPE['sequence_len']} tokens)")
    result = train(config, corpus, log_every=50)
    t0 = time.perf_counter()
    settings = [SolveSetting(k, p) for p in ("all", "half") for k in args.iterations]
    bpt = corpus.val_bytes_per_token
    kw = {"batch_size": args.eval_batch, "device": args.device, "bytes_per_token": bpt, "label": name}
    rows = evaluate_model(result.model, windows, settings, **kw)
    print(markdown_table(rows, {name: SHAPE["n_layer"]}))
    return {
        "name": name, "spec": spec, "regulariser": None if reg is None else {**reg.__dict__}, "lr": config.lr,
        "steps": args.steps, "tokens": result.tokens, "train_s": round(result.seconds, 1),
        "ms_per_step": round(result.seconds / args.steps * 1e3, 2), "eval_s": round(time.perf_counter() - t0, 1),
        "history": result.history, "rows": rows,
    }  # fmt: skip


def targets(variants: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, for each regularised variant against the first baseline."""
    base = next((v for v in variants if v["regulariser"] is None), None)
    lines = []
    for v in variants:
        if v["regulariser"] is None or base is None:
            continue
        seq = next(r for r in v["rows"] if r["mode"] == "sequential")["ppl"]
        base_seq = next(r for r in base["rows"] if r["mode"] == "sequential")["ppl"]
        k2_rows = [r for r in v["rows"] if r["K"] == 2 and r["parallel"] == SHAPE["n_layer"]]
        if not k2_rows:  # K=2 all-parallel not evaluated in this run
            continue
        k2 = k2_rows[0]["ppl"]
        d_seq, d_k2 = seq / base_seq - 1, k2 / seq - 1
        lines.append(
            f"- {v['name']}: sequential ppl {seq:.3f} vs baseline {base_seq:.3f} ({d_seq * 100:+.2f}%, target "
            f"within {TARGET_SEQ * 100:.0f}%: {'met' if abs(d_seq) <= TARGET_SEQ or d_seq < 0 else 'missed'}); "
            f"K=2 all-parallel ppl {k2:.3f}, {d_k2 * 100:+.2f}% vs its own sequential (target within "
            f"{TARGET_K2 * 100:.0f}%: {'met' if d_k2 <= TARGET_K2 else 'missed'})"
        )
    return lines


def write(out: Path, meta: dict[str, Any], variants: list[dict[str, Any]], name: str = NAME) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**meta, "variants": variants}, indent=2) + "\n")
    rows = [r for v in variants for r in v["rows"]]
    env = meta["environment"]
    lines = [
        f"## SNLP-aware training: {meta['model']} with {', '.join(f'{k}={v}' for k, v in SHAPE.items())}",
        "",
        f"Device: {common.device_label(env)}, torch {env['torch']}, Python {env['python']}. Text: "
        f"{', '.join(meta.get('sources', ['its stdlib sources']))}. Data: {meta['data']}.",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in meta["commands"]),
        "",
    ]
    keys = ("weight", "iterations", "suffix_sizes", "every", "stop_gradient", "ramp_steps")
    regs = [
        v["regulariser"] and ", ".join(f"{k}={v['regulariser'].get(k, 1)}" for k in keys) for v in variants
    ]
    cells = [[v["name"], reg or "-", v["lr"], v["steps"], f"{v['tokens']:,}", v["train_s"], v["ms_per_step"], v["eval_s"]]
             for v, reg in zip(variants, regs)]  # fmt: skip
    lines += common.md_table(
        ["variant", "regulariser", "lr", "steps", "tokens", "train s", "ms/step", "eval s"], cells
    )
    lines += [
        "",
        f"Held-out evaluation: {meta['eval']}.",
        "",
        markdown_table(rows, {v["name"]: SHAPE["n_layer"] for v in variants}),
    ]
    goal = targets(variants)
    if goal:
        lines += ["Targets:", "", *goal, ""]
    if meta.get("notes"):
        lines += [meta["notes"].rstrip(), ""]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    if rows:
        title = f"{meta['model']} L={SHAPE['n_layer']} d={SHAPE['n_embd']}: held-out ppl vs K"
        plot_ppl_vs_k(rows, out / f"{name}.png", title=title)


def merge(paths: list[str], out: Path, name: str, notes: str | None) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(runs[0])
    meta.pop("variants")
    meta["commands"] = [*(c for r in runs for c in r["commands"]), common.command("train-gpu", None)]
    meta["environments"] = [r["environment"] for r in runs]
    if notes:
        meta["notes"] = Path(notes).read_text()
    write(out, meta, [v for r in runs for v in r["variants"]], name)
    print((out / f"{name}.md").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["baseline", "regularised:weight=1.0"])
    p.add_argument("--model", default=MODEL, help="nanochat-small, or mhc-small / mhc-dyn-small (HCN)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", nargs="+", default=None, help="text files or folders (default: the stdlib)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap on the train and the held-out text, each")
    p.add_argument("--smoke", action="store_true", help="tiny shape and steps: checks the script runs (CPU)")
    p.add_argument("--merge", nargs="+", default=None, help="combine the JSON of earlier runs")
    p.add_argument("--notes", default=None, help="with --merge: a markdown file appended to the table")
    p.add_argument("--name", default=NAME, help="file stem of the results")
    p.add_argument("--out", default=None, help=common.OUT_HELP + common.SMOKE_OUT_HELP)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    out = common.out_dir_from(args.out, args.smoke)
    if args.merge:
        merge(args.merge, out, args.name, args.notes)
        return 0
    if args.smoke:
        SHAPE.update(n_layer=4, n_embd=64, sequence_len=64)
    device = torch.device(args.device)
    corpus = load_corpus(args.data, max_bytes=400_000 if args.smoke else args.max_bytes)
    windows = eval_windows(corpus.val, SHAPE["sequence_len"], args.eval_windows)
    meta = {
        "environment": common.environment(device),
        "commands": [common.command("train-gpu", argv)],
        "model": args.model,
        "shape": SHAPE,
        "data": corpus.describe(),
        "sources": args.data or ["the stdlib sources of the running interpreter"],
        "eval": (
            f"{windows.size(0)} windows of {SHAPE['sequence_len']} tokens spread over the held-out files; fp32; "
            f"K in {args.iterations}, all {SHAPE['n_layer']} layers or the last {SHAPE['n_layer'] // 2} parallel, init h0"
        ),
        "targets": {"seq_within": TARGET_SEQ, "k2_all_within": TARGET_K2},
    }
    print(f"data: {corpus.describe()}")
    variants: list[dict[str, Any]] = []
    for spec in args.variants:
        variants.append(run_variant(spec, args, corpus, windows))
        write(out, meta, variants, args.name)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(targets(variants)))
    return 0
