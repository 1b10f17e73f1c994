"""Train a reference model on real text (default: this Python's stdlib sources), optionally with the SNLP-aware regulariser.

snlp-compile train --model nanochat-tiny --steps 300 --out runs/base
snlp-compile train --model nanochat-tiny --steps 300 --reg-weight 1.0 --out runs/reg
"""

from __future__ import annotations

import argparse
import ast
import json
from typing import Any

from ..models import MODEL_NAMES


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """['n_layer=16', 'backout=False'] -> {'n_layer': 16, 'backout': False}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", nargs="+", default=None, help="files or folders (default: this Python's stdlib)"
    )
    parser.add_argument("--suffix", default=".py", help="file suffix searched for in folders")
    parser.add_argument("--max-bytes", type=int, default=None, help="cap on train and on held-out text, each")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of files held out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="nanochat-tiny", choices=MODEL_NAMES)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="model config override"
    )
    add_data_arguments(parser)
    parser.add_argument("--tokenizer", choices=("bytes", "bpe"), default="bytes")
    parser.add_argument("--bpe-vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA"
    )
    reg = parser.add_argument_group("SNLP-aware regulariser (off unless --reg-weight > 0)")
    reg.add_argument("--reg-weight", type=float, default=0.0, help="lambda; 0 trains the baseline")
    reg.add_argument(
        "--reg-suffix", type=int, nargs="+", default=None, help="parallel-suffix sizes (default: all)"
    )
    reg.add_argument("--reg-every", type=int, default=1, help="count every S-th layer's error")
    reg.add_argument(
        "--reg-iterations", type=int, default=1, help="K of the regularised trace (1: the paper's)"
    )
    reg.add_argument("--reg-stop-gradient", action="store_true", help="detach the sequential target")
    reg.add_argument("--reg-ramp", type=int, default=None, help="lambda warm-up steps (default: steps // 4)")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the final loss")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..train import RegulariserConfig, TrainConfig, load_corpus, save_checkpoint, train

    corpus = load_corpus(
        args.data,
        val_fraction=args.val_fraction,
        max_bytes=args.max_bytes,
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.bpe_vocab,
        suffix=args.suffix,
    )
    print(f"data: {corpus.describe()}")
    regulariser = None
    if args.reg_weight > 0:
        regulariser = RegulariserConfig(
            weight=args.reg_weight,
            suffix_sizes=tuple(args.reg_suffix) if args.reg_suffix else None,
            every=args.reg_every,
            stop_gradient=args.reg_stop_gradient,
            iterations=args.reg_iterations,
            ramp_steps=args.steps // 4 if args.reg_ramp is None else args.reg_ramp,
        )
    config = TrainConfig(
        model=args.model,
        model_overrides=parse_assignments(args.set),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=min(args.warmup, args.steps),
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        regulariser=regulariser,
        eval_windows=args.eval_windows,
        progress=not args.no_progress,
    )
    result = train(config, corpus)
    folder = save_checkpoint(
        args.out,
        result.model,
        args.model,
        tokenizer=corpus.tokenizer.to_json(),
        data=corpus.spec,
        train=training_record(config),
        result=result.summary(),
    )
    val = result.val
    print(
        f"trained {result.tokens:,} tokens in {result.seconds:.1f}s; held-out sequential ppl {val['ppl']:.3f}, "
        f"{val['bpb']:.4f} bits/byte; checkpoint: {folder}"
    )
    return 0


def training_record(config: Any) -> dict[str, Any]:
    """The training config as JSON-ready data (the regulariser's fields inlined)."""
    import dataclasses

    record = dataclasses.asdict(config)
    return json.loads(json.dumps(record, default=str))
