"""Generate tokens with the KV-cached decode path: sequential, through an SNLP decode step (-K), or
lossless speculative decoding (--speculative: the SNLP step drafts --block-size tokens, the
sequential step or its exact lowering (--verifier) verifies them; the tokens are the sequential
model's) with its statistics.

snlp-compile generate runs/base --prompt "def main(" --speculative --block-size 4
snlp-compile generate --model nanochat-tiny --speculative --block-size 8 --adaptive --check
snlp-compile generate runs/base --speculative --draft-parallel 8 --draft-iterations 2 --verifier exact-seq
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_MODEL,
    DTYPE_NAMES,
    CLIError,
    announce,
    load_model,
    require,
    require_device,
    status,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", nargs="?", default=None, help="a folder written by `snlp-compile train` (else --model)"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="built-in model with random weights (no checkpoint)"
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="parameter dtype")
    parser.add_argument("--prompt", default=None, help="prompt text (a checkpoint's tokenizer encodes it)")
    parser.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens when no --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument(
        "-K", "--iterations", type=int, default=None, help="decode through the SNLP step at K"
    )
    parser.add_argument(
        "--init",
        choices=("h0", "batch_fwd", "warm"),
        default="h0",
        help="the SNLP step's init (default h0: trained models converge better from it than from warm, frontier.md)",
    )
    parser.add_argument("--speculative", action="store_true", help="lossless speculative decoding")
    parser.add_argument("--block-size", type=int, default=None, help="γ: tokens drafted per verification (4)")
    parser.add_argument("--draft-iterations", type=int, default=None, help="K of the drafting SNLP step (1)")
    parser.add_argument("--adaptive", action="store_true", help="adapt the block size between rounds (<= γ)")
    staged = "draft with only the last P layers parallel (stages (1,) * (L - P) + (P,)): drafts that converge"
    parser.add_argument("--draft-parallel", type=int, default=None, metavar="P", help=staged)
    parser.add_argument(
        "--verifier",
        choices=("sequential", "exact-seq"),
        default="sequential",
        help="verify with the step as written or the compiler's exact sequential lowering",
    )
    parser.add_argument("--cuda-graphs", action="store_true", help="replay draft and verify from CUDA graphs")
    parser.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of mass p")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, prompt and sampling")
    parser.add_argument("--check", action="store_true", help="also decode sequentially and compare (greedy)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    parser.add_argument("--json", default=None, help="write tokens and statistics here")


def _model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.checkpoint is None:
        return load_model(args.model, args.dtype, args.seed).to(args.device).eval(), None
    require("generate from a checkpoint (safetensors)", "safetensors")
    from ..train import load_checkpoint, read_checkpoint_info
    from ..train.data import tokenizer_from_json

    info = read_checkpoint_info(args.checkpoint)
    spec = info.get("tokenizer")
    if spec and spec.get("kind") == "bpe":
        require("a checkpoint with a BPE tokenizer", "tokenizers")
    model = load_checkpoint(args.checkpoint, device=args.device, dtype=_dtype(args.dtype))
    return model.eval(), tokenizer_from_json(spec) if spec else None


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def run(args: argparse.Namespace) -> int:
    require_device(args.device)
    import torch

    from .. import SNLPConfig
    from ..decoding import Decoder, generate

    if args.speculative and args.iterations is not None:
        raise CLIError("--speculative drafts with --draft-iterations; -K is the approximate SNLP decode")
    if not args.speculative:
        given = {
            "--block-size": args.block_size is not None, "--draft-iterations": args.draft_iterations is not None,
            "--draft-parallel": args.draft_parallel is not None, "--adaptive": args.adaptive,
            "--verifier": args.verifier != "sequential", "--cuda-graphs": args.cuda_graphs,
        }  # fmt: skip
        if any(given.values()):
            flags = ", ".join(name for name, on in given.items() if on)
            raise CLIError(f"{flags}: for speculative decoding, add --speculative")
    args.block_size = 4 if args.block_size is None else args.block_size
    args.draft_iterations = 1 if args.draft_iterations is None else args.draft_iterations
    if args.block_size < 1 or args.draft_iterations < 1:
        raise CLIError(
            f"--block-size and --draft-iterations must be >= 1, got {args.block_size}, {args.draft_iterations}"
        )
    if args.check and args.sample:
        raise CLIError("--check compares greedy tokens: leave out --sample")
    model, tok = _model_and_tokenizer(args)
    if args.prompt is not None:
        if tok is None:
            raise CLIError("--prompt needs a checkpoint's tokenizer; without one, --prompt-len random tokens")
        prompt = torch.as_tensor(tok.encode(args.prompt.encode()), dtype=torch.long)[None]
    else:
        vocab = model.config.vocab_size
        prompt = torch.randint(
            0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed)
        )
    prompt = prompt.to(args.device)
    max_len = prompt.shape[1] + args.max_new_tokens
    kw: dict[str, Any] = {"batch": 1, "max_len": max_len}
    if args.speculative:
        n, p = model.config.n_layer, args.draft_parallel
        if p is not None and not 1 <= p <= n:
            raise CLIError(f"--draft-parallel must lie in 1..{n} (the model's layers), got {p}")
        stages = 1 if p is None or p == n else (1,) * (n - p) + (p,)
        draft = SNLPConfig(iterations=args.draft_iterations, init=args.init, stages=stages)
        kw.update(speculative=draft, block_size=args.block_size, adaptive_block_size=args.adaptive)
        kw.update(cuda_graphs=args.cuda_graphs, verifier=args.verifier)
        what = f"speculative, draft K={args.draft_iterations} {args.init}"
        what += f" P={p}" if p is not None else ""
        what += f", {args.verifier} verifier, block size {args.block_size}"
        what += " (adaptive)" if args.adaptive else ""
    elif args.iterations is not None:
        kw["config"] = SNLPConfig(iterations=args.iterations, init=args.init)
        what = f"SNLP decode K={args.iterations} {args.init} (approximate)"
    else:
        what = "sequential"
    sampling = {"greedy": not args.sample, "temperature": args.temperature, "top_k": args.top_k}
    sampling.update(top_p=args.top_p, seed=args.seed)
    status(f"generate: {args.max_new_tokens} tokens after a {prompt.shape[1]}-token prompt, {what}")
    decoder = Decoder(model, **kw)
    t0 = time.perf_counter()
    tokens, stats = generate(decoder, prompt, args.max_new_tokens, return_stats=True, **sampling)
    seconds = time.perf_counter() - t0
    new = tokens[0, prompt.shape[1] :].tolist()
    print(tok.decode(new) if tok is not None and hasattr(tok, "decode") else " ".join(map(str, new)))
    result: dict[str, Any] = {"tokens": new, "seconds": seconds, "mode": what}
    status(f"{len(new)} tokens in {seconds:.2f} s (prefill and any capture included)")
    if stats is not None:
        status(f"speculative: {stats.summary()}")
        result["stats"] = stats.as_dict()
    if args.check:
        ref = generate(model, prompt, args.max_new_tokens)
        same = bool(torch.equal(ref, tokens))
        status(
            f"check: {'the same tokens as' if same else 'DIFFERENT tokens from'} sequential greedy decoding"
        )
        result["same_as_sequential"] = same
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        announce("tokens and statistics (JSON)", args.json)
    return 0
