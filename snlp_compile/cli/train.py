"""Train a reference model on real text (default: this Python's stdlib sources): the baseline, with
the SNLP-aware regulariser (the paper's recipe by default), or fine-tuned through the SNLP forward.

snlp-compile train --model nanochat-tiny --steps 300 --out runs/base
snlp-compile train --model nanochat-tiny --steps 300 --objective regulariser --out runs/reg
snlp-compile train --objective snlp-forward --init-from runs/base --parallel-layers 4 --iterations 2 \
    --steps 100 --out runs/sft
snlp-compile train --model ./my-llama --objective regulariser --data notes/ --suffix .txt --out runs/llama-reg
    (a local transformers folder: its safetensors weights, its own tokenizer.json if it has one,
     saved back with save_pretrained so its own class loads the result)
"""

from __future__ import annotations

import argparse
import ast
import json
from typing import Any

from .common import DEFAULT_MODEL, CLIError, announce, require, require_device


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """['n_layer=16', 'backout=False'] -> {'n_layer': 16, 'backout': False}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects key=value, got {item!r}")
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
    parser.add_argument(
        "--model",
        default="nanochat-tiny",
        help=f"built-in reference model to train from scratch (nanochat-tiny, {DEFAULT_MODEL}, gpt-tiny, mhc-tiny, "
        "...), 'module.path:factory' returning an nn.Module, or a local transformers folder (config.json + "
        "safetensors weights, fine-tuned; a config alone: random weights) or config.json; nothing is downloaded",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="model config override"
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--tokenizer",
        choices=("bytes", "bpe"),
        default="bytes",
        help="bytes, or a byte-level BPE trained here (a transformers folder with a tokenizer uses its own)",
    )
    parser.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary size (--tokenizer bpe)")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    parser.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr (cosine)"
    )
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA"
    )
    parser.add_argument(
        "--objective",
        choices=("ce", "regulariser", "snlp-forward", "both"),
        default=None,
        help="ce: sequential cross-entropy (baseline); regulariser: ce + lambda * the K=1 trace error; "
        "snlp-forward: cross-entropy of the K-iteration SNLP forward (--parallel-layers, --iterations, "
        "--init); both: the two added (default: regulariser if --reg-weight > 0 is given, else ce)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT",
        help="checkpoint (folder or .safetensors) to fine-tune; the model keeps its config and tokenizer "
        "(--model, --set, --tokenizer are then ignored); a transformers folder here is the same as --model FOLDER",
    )
    reg = parser.add_argument_group(
        "SNLP-aware regulariser (objective regulariser or both; defaults: the paper's)"
    )
    reg.add_argument(
        "--reg-weight",
        type=float,
        default=None,
        help="lambda (default 0.0625); > 0 without --objective: regulariser",
    )
    reg.add_argument(
        "--reg-reduction", choices=("sum", "mean"), default="sum", help="over the counted layers"
    )
    reg.add_argument(
        "--reg-suffix",
        type=int,
        nargs="+",
        default=None,
        help="parallel-suffix sizes (overrides the fractions)",
    )
    reg.add_argument(
        "--reg-suffix-fractions",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.75],
        help="suffix sizes as fractions of the parallelisable layers (1.0: one suffix of all)",
    )
    reg.add_argument("--reg-every", type=int, default=3, help="count every S-th layer's error (and the last)")
    reg.add_argument(
        "--reg-iterations", type=int, default=1, help="K of the regularised trace (1: the paper's)"
    )
    reg.add_argument(
        "--reg-stop-gradient",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="detach the sequential target (default on)",
    )
    reg.add_argument(
        "--reg-ramp", type=int, default=None, help="lambda warm-up steps (default: 20%% of --steps)"
    )
    snlp = parser.add_argument_group("SNLP forward (objective snlp-forward or both): the deployed solve")
    snlp.add_argument(
        "--parallel-layers",
        type=int,
        default=None,
        help="the last N layers solved in parallel (default: all)",
    )
    snlp.add_argument("--iterations", type=int, default=1, help="K, parallel iterations of the solve")
    snlp.add_argument("--init", choices=("h0", "batch_fwd"), default="h0", help="the solve's initial iterate")
    snlp.add_argument(
        "--fused-layers",
        type=int,
        default=1,
        help="M: train through wide layers of M (SNLPConfig.fused_layers, the paper's chunkwise fusion; "
        "the model is then deployed with the same M)",
    )
    snlp.add_argument(
        "--seq-ce-weight",
        type=float,
        default=None,
        help="weight of the sequential cross-entropy (default: 0 for snlp-forward, 1 otherwise)",
    )
    snlp.add_argument(
        "--distill-weight",
        type=float,
        default=0.0,
        help="weight of KL(starting model's sequential distribution || SNLP's)",
    )
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the final loss")
    parser.add_argument(
        "--out", required=True, help="checkpoint to write: a folder, or one file if it ends in .safetensors"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (a terminal gets a bar, a log file a line every 20 s)",
    )


def run(args: argparse.Namespace) -> int:
    from ..config import SNLPConfig
    from ..models import MODEL_NAMES
    from ..train import (
        RegulariserConfig,
        TrainConfig,
        checkpoint_tokenizer,
        load_corpus,
        read_checkpoint_info,
        train,
    )
    from ..train.hf_folder import is_transformers_path
    from ..train.model_source import ModelSource, resolve_model

    require("train (the checkpoint is written with safetensors)", "safetensors")
    require_device(args.device)
    objective: Any = args.objective or ("regulariser" if (args.reg_weight or 0) > 0 else "ce")
    tokenizer: Any = args.tokenizer
    model_name, overrides = args.model, parse_assignments(args.set)
    source: ModelSource | None = None
    init_from = args.init_from
    if init_from is not None and is_transformers_path(init_from):
        model_name, init_from = init_from, None
    if init_from is not None:
        info = read_checkpoint_info(init_from)
        model_name, overrides = info["model"], {}
        tokenizer = checkpoint_tokenizer(init_from) or "bytes"
    elif model_name not in MODEL_NAMES:
        if overrides:
            raise CLIError(f"--set changes a built-in model's config; {model_name!r} brings its own")
        if is_transformers_path(model_name):
            require(f"--model {model_name} (a transformers folder)", "transformers")
        source = resolve_model(model_name, seed=args.seed)
        if source.tokenizer is not None:
            tokenizer = source.tokenizer
            ignored = " (--tokenizer ignored)" if args.tokenizer != "bytes" else ""
            print(f"tokenizer: the model folder's own{ignored}")
    if tokenizer == "bpe":
        require("train with the 'bpe' tokenizer", "tokenizers")
    regulariser = None
    if objective in ("regulariser", "both"):
        regulariser = RegulariserConfig(
            weight=0.0625 if args.reg_weight is None else args.reg_weight,
            reduction=args.reg_reduction,
            suffix_sizes=tuple(args.reg_suffix) if args.reg_suffix else None,
            suffix_fractions=tuple(args.reg_suffix_fractions),
            every=args.reg_every,
            stop_gradient=args.reg_stop_gradient,
            iterations=args.reg_iterations,
            ramp_steps=args.reg_ramp,  # None: 20% of the steps
        )
    snlp = None
    if objective in ("snlp-forward", "both"):
        snlp = SNLPConfig(
            parallel_layers=args.parallel_layers,
            iterations=args.iterations,
            init=args.init,
            fused_layers=args.fused_layers,
        )
    config = TrainConfig(
        model=model_name,
        model_overrides=overrides,
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
        objective=objective,
        snlp=snlp,
        seq_ce_weight=args.seq_ce_weight,
        distill_weight=args.distill_weight,
        init_from=init_from,
    )
    # (the settings are checked above, before the corpus is read and tokenised: a typo fails at once)
    corpus = load_corpus(
        args.data,
        val_fraction=args.val_fraction,
        max_bytes=args.max_bytes,
        tokenizer=tokenizer,
        bpe_vocab_size=args.bpe_vocab,
        suffix=args.suffix,
    )
    print(f"data: {corpus.describe()}")
    result = train(config, corpus) if source is None else train(source, corpus, config)
    folder = result.save(args.out, tokenizer=corpus.tokenizer, data=corpus.spec)
    val = result.val
    solved = f"; through the solve {val['snlp_ppl']:.3f}" if "snlp_ppl" in val else ""
    print(
        f"trained {result.tokens:,} tokens in {result.seconds:.1f}s; held-out sequential ppl {val['ppl']:.3f}, "
        f"{val['bpb']:.4f} bits/byte{solved}"
    )
    announce("checkpoint", folder)
    return 0


def training_record(config: Any) -> dict[str, Any]:
    """The training config as JSON-ready data (the regulariser's fields inlined)."""
    import dataclasses

    record = dataclasses.asdict(config)
    return json.loads(json.dumps(record, default=str))
