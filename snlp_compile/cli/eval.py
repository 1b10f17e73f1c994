"""Held-out perplexity and bits/byte of trained checkpoints, sequential and through SNLP solves (table, JSON, plot).

snlp-compile eval runs/base runs/reg -K 1 2 4 --parallel all half --plot ppl.png
snlp-compile eval runs/reg -K 1 2 --chunks 1 2 4     # chunkwise decomposition too
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from .train import add_data_arguments


def _parallel(value: str) -> int | str:
    if value in ("all", "half"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'half' or a layer count, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders written by `snlp-compile train`")
    parser.add_argument(
        "--label", nargs="+", default=None, help="one name per checkpoint (default: folder names)"
    )
    parser.add_argument("-K", "--iterations", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--parallel", type=_parallel, nargs="+", default=["all", "half"])
    parser.add_argument("--init", nargs="+", choices=("h0", "batch_fwd"), default=["h0"])
    parser.add_argument(
        "--chunks",
        type=int,
        nargs="+",
        default=[1],
        help="SNLPConfig.chunks: consecutive chunks solved one after another",
    )
    add_data_arguments(parser)
    parser.set_defaults(val_fraction=None, suffix=None)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the training sequence length")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows evaluated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--markdown", default=None, help="write the table here")
    parser.add_argument("--plot", default=None, help="write perplexity against K here (PNG)")


def run(args: argparse.Namespace) -> int:
    from ..train import (
        SolveSetting,
        evaluate_model,
        load_checkpoint,
        markdown_table,
        plot_ppl_vs_k,
        read_checkpoint_info,
    )
    from ..train.data import eval_windows, load_corpus, tokenizer_from_json

    if args.label is not None and len(args.label) != len(args.checkpoints):
        raise SystemExit(f"--label needs {len(args.checkpoints)} names, got {len(args.label)}")
    labels = args.label or [Path(c).name for c in args.checkpoints]
    settings = [
        SolveSetting(k, p, i, c)
        for p, i, c, k in itertools.product(args.parallel, args.init, args.chunks, args.iterations)
    ]
    rows: list[dict[str, Any]] = []
    layers: dict[str, int] = {}
    corpora: dict[str, Any] = {}
    for folder, label in zip(args.checkpoints, labels):
        info = read_checkpoint_info(folder)
        spec = dict(info["data"])
        for key in ("data", "max_bytes", "val_fraction", "suffix"):
            if getattr(args, key) is not None:
                spec["sources" if key == "data" else key] = getattr(args, key)
        key = json.dumps([spec, info["tokenizer"]], sort_keys=True)
        if key not in corpora:
            corpora[key] = load_corpus(tokenizer=tokenizer_from_json(info["tokenizer"]), **spec)
            print(f"data: {corpora[key].describe()}")
        corpus = corpora[key]
        seq_len = args.seq_len or info["train"]["seq_len"]
        model = load_checkpoint(folder, device=args.device)
        layers[label] = int(info["model_config"].get("n_layer", 0))
        windows = eval_windows(corpus.val, seq_len, args.windows)
        rows += evaluate_model(
            model,
            windows,
            settings,
            batch_size=args.batch_size,
            device=args.device,
            bytes_per_token=corpus.val_bytes_per_token,
            label=label,
        )
    table = markdown_table(rows, layers)
    print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "checkpoints": args.checkpoints}, indent=2) + "\n"
        )
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot_ppl_vs_k(rows, args.plot, title="held-out perplexity against K")
    return 0
