"""Layer-parallel decoding across processes: each rank holds one contiguous block of the layers
(weights and K/V caches); every rank gets the same tokens. In exact mode (K = layers) they equal
the single-process sequential model's, which rank 0 checks here.

    torchrun --nproc-per-node 2 examples/generate_across_processes.py           # CPU, gloo
    torchrun --nproc-per-node 4 examples/generate_across_processes.py --cuda    # one GPU per rank
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import snlp_compile
from snlp_compile import SNLPConfig
from snlp_compile.models import build_model


def require_cuda() -> None:
    """Without a CUDA GPU, --cuda stops before the process group, in one line (rank 0 says it)."""
    if torch.cuda.is_available():
        return
    if os.environ.get("RANK", "0") != "0":
        raise SystemExit(2)
    raise SystemExit(
        f"generate_across_processes.py --cuda: no CUDA GPU is available to torch {torch.__version__}; "
        "run without --cuda (gloo on CPUs)"
    )


def main(cuda: bool = False, new_tokens: int = 32) -> bool:
    if cuda:
        require_cuda()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    model = build_model("gpt-small", device=device)  # seeded: the same weights on every rank
    layers = model.config.n_layer
    prompt = torch.tensor([[1, 2, 3, 4]], device=device)
    group = dist.group.WORLD
    dec = snlp_compile.Decoder(model, SNLPConfig(iterations=layers), batch=1, max_len=64, process_group=group)
    tokens = snlp_compile.generate(dec, prompt, new_tokens)  # exact: K = layers
    fast = snlp_compile.Decoder(model, SNLPConfig(iterations=1), batch=1, max_len=64, process_group=group)
    snlp_compile.generate(fast, prompt, new_tokens)  # K = 1: one all_gather per token
    same = True
    if dist.get_rank() == 0:
        same = torch.equal(tokens, snlp_compile.generate(model, prompt, new_tokens))
        print(
            f"{dist.get_world_size()} ranks, rank 0 holds {dec.k_cache.shape[0]} of {layers} layers;"
            f" exact tokens equal the sequential model's: {same}"
        )
    dist.destroy_process_group()
    return same


if __name__ == "__main__":
    sys.exit(0 if main(cuda="--cuda" in sys.argv) else 1)
