"""Held-out perplexity and bits/byte of trained checkpoints, sequential and through SNLP solves
(table, JSON, plot; the plot needs matplotlib: the 'plot' extra).

snlp-compile eval runs/base runs/reg -K 1 2 4 --parallel all half --plot ppl.png
snlp-compile eval runs/reg -K 1 2 --stages 1 2 4     # stages solved one after another too
snlp-compile eval ./my-llama --data notes/ --suffix .txt -K 1 2   # a local transformers folder
snlp-compile eval runs/tail -K 1 2 --parallel 6 --init h0 warm --decode  # the KV-cached decode step
snlp-compile eval runs/fused -K 1 2 --parallel 6 --fused-layers 3         # a tail trained as wide layers

A model is a checkpoint of `snlp-compile train`, a local transformers folder (its safetensors
weights and its own tokenizer.json; text as bytes when it has none), 'module.path:factory' or a
built-in name (random weights). The held-out text is the one the model was trained on when its
checkpoint records it, else --data (default: this Python's stdlib).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from .common import CLIError, add_stages_option, announce, require, require_device, status
from .train import add_data_arguments


def _parallel(value: str) -> int | str:
    if value in ("all", "half"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'half' or a layer count, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="+",
        help="checkpoints written by `snlp-compile train`, local transformers folders, 'module.path:factory' "
        "or built-in names",
    )
    parser.add_argument(
        "--label", nargs="+", default=None, help="one name per checkpoint (default: folder names)"
    )
    parser.add_argument(
        "-K", "--iterations", type=int, nargs="+", default=[1, 2, 4], help="K values evaluated"
    )
    parser.add_argument(
        "--parallel",
        type=_parallel,
        nargs="+",
        default=["all", "half"],
        help="parallel layers: 'all', 'half' (of the parallelisable ones) or a count",
    )
    parser.add_argument(
        "--init",
        nargs="+",
        choices=("h0", "batch_fwd", "warm"),
        default=["h0"],
        help="the solve's initial iterates (warm: the previous token's trace, --decode only)",
    )
    parser.add_argument(
        "--fused-layers",
        type=int,
        nargs="+",
        default=[1],
        help="SNLPConfig.fused_layers: wide layers of M (the function of a model trained fused; a "
        "parallel count that is not a multiple of M is skipped)",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="measure the KV-cached decode step, teacher-forced token by token (the path that is "
        "timed and deployed) instead of the full-sequence forward; models that decode only",
    )
    add_stages_option(
        parser,
        type=int,
        nargs="+",
        default=[1],
        help="SNLPConfig.stages: consecutive stages solved one after another",
    )
    add_data_arguments(parser)
    parser.set_defaults(val_fraction=None, suffix=None)
    parser.add_argument(
        "--seq-len", type=int, default=None, help="default: the training sequence length (else 128)"
    )
    parser.add_argument("--windows", type=int, default=64, help="held-out windows evaluated")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--markdown", default=None, help="write the table here")
    parser.add_argument("--plot", default=None, help="write perplexity against K here (PNG)")


def run(args: argparse.Namespace) -> int:
    require("eval (checkpoints are safetensors)", "safetensors")
    if args.plot:
        require("eval --plot", "matplotlib")
    require_device(args.device)
    from ..train import SolveSetting, UnfitSetting, evaluate_model, markdown_table, plot_ppl_vs_k
    from ..train.data import eval_windows, load_corpus
    from ..train.eval_source import load_for_eval
    from ..train.hf_folder import model_layers

    if args.label is not None and len(args.label) != len(args.checkpoints):
        raise CLIError(f"--label needs {len(args.checkpoints)} names, got {len(args.label)}")
    labels = args.label or [Path(c).name for c in args.checkpoints]
    if "warm" in args.init and not args.decode:
        raise CLIError("--init warm starts from the previous token's trace: it exists only with --decode")
    if args.decode and args.stages != [1]:
        raise CLIError("--decode solves one stage: leave out --stages")
    if any(m < 1 for m in args.fused_layers):
        raise CLIError(f"--fused-layers takes sizes >= 1, got {args.fused_layers}")
    settings = [
        SolveSetting(k, p, i, c, m)
        for p, i, c, m, k in itertools.product(
            args.parallel, args.init, args.stages, args.fused_layers, args.iterations
        )
    ]
    rows: list[dict[str, Any]] = []
    layers: dict[str, int] = {}
    corpora: dict[str, Any] = {}
    for folder, label in zip(args.checkpoints, labels):
        model_eval = load_for_eval(folder, args.device)
        spec = dict(model_eval.data)
        for key in ("data", "max_bytes", "val_fraction", "suffix"):
            if getattr(args, key) is not None:
                spec["sources" if key == "data" else key] = getattr(args, key)
        tokenizer = model_eval.tokenizer
        key = json.dumps([spec, tokenizer.to_json()], sort_keys=True)
        if key not in corpora:
            corpora[key] = load_corpus(tokenizer=tokenizer, **spec)
            print(f"data: {corpora[key].describe()}", flush=True)
        corpus = corpora[key]
        seq_len = args.seq_len or model_eval.seq_len
        model = model_eval.model
        layers[label] = model_layers(model)
        windows = eval_windows(corpus.val, seq_len, args.windows)
        status(
            f"eval {label}: sequential and {len(settings)} SNLP setting(s) over {windows.size(0)} windows "
            f"of {seq_len} tokens ..."
        )
        try:
            rows += evaluate_model(
                model,
                windows,
                settings,
                batch_size=args.batch_size,
                device=args.device,
                bytes_per_token=corpus.val_bytes_per_token,
                label=label,
                progress=lambda row: status(_progress_line(row)),
                decode=args.decode,
                skip_unfit=lambda why: status(f"  {why}"),
            )
        except UnfitSetting as exc:  # a --parallel the model's chain cannot take: a usage error
            raise CLIError(str(exc)) from None
    table = markdown_table(rows, layers)
    print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "checkpoints": args.checkpoints}, indent=2) + "\n"
        )
        announce("rows (JSON)", args.json)
    if args.markdown:
        Path(args.markdown).write_text(table)
        announce("table", args.markdown)
    if args.plot:
        announce("plot", plot_ppl_vs_k(rows, args.plot, title="held-out perplexity against K"))
    return 0


def _progress_line(row: dict[str, Any]) -> str:
    if row["mode"] == "sequential":
        return f"  {row['model']}: sequential ppl {row['ppl']:.3f}"
    stages = f", {row['stages']} stages" if (row.get("stages") or 1) > 1 else ""
    fused = f", wide layers of {row['fused_layers']}" if (row.get("fused_layers") or 1) > 1 else ""
    path = " (decode step)" if row.get("path") == "decode" else ""
    return (
        f"  {row['model']}: K={row['K']}, {row['parallel']} parallel, init {row['init']}{stages}{fused}{path}: "
        f"ppl {row['ppl']:.3f} ({100 * row['gap']:+.2f}%)"
    )
