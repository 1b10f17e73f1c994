"""Training a reference model on real text, with or without the SNLP-aware regulariser.

AdamW (weight decay on matrices only), linear warm-up then cosine decay, gradient clipping,
bf16 autocast on CUDA, a tqdm progress bar. Baseline and regularised runs given the same config
and seed see the same initial weights and the same batches, so their difference is the
regulariser alone.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model, model_config
from .data import Corpus, eval_windows, random_batches
from .evaluate import logits_of, perplexity
from .regulariser import RegulariserConfig, SNLPRegulariser

_CONTEXT_FIELDS = ("sequence_len", "block_size")


@dataclass
class TrainConfig:
    """One training run. ``regulariser=None`` is the baseline."""

    model: str = "nanochat-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 500
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    bf16: bool | None = None  # None: on for CUDA, off elsewhere
    regulariser: RegulariserConfig | None = None
    eval_windows: int = 64  # held-out windows for the final sequential loss
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"TrainConfig.warmup_steps must be in [0, steps], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]]  # one row per logged step
    seconds: float
    tokens: int
    val: dict[str, float]  # final held-out sequential loss / perplexity / bits per byte

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "tokens": self.tokens,
            "val": self.val,
            "last": self.history[-1],
        }


def build_for_corpus(config: TrainConfig, corpus: Corpus) -> nn.Module:
    """The named model with its vocabulary sized to the tokenizer and its context checked."""
    overrides = dict(config.model_overrides)
    vocab = corpus.tokenizer.vocab_size
    overrides.setdefault("vocab_size", vocab)
    if overrides["vocab_size"] < vocab:
        raise ValueError(f"vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {vocab}")
    cfg = model_config(config.model, **overrides)
    context = next((getattr(cfg, f) for f in _CONTEXT_FIELDS if hasattr(cfg, f)), None)
    if context is not None and context < config.seq_len:
        raise ValueError(
            f"seq_len={config.seq_len} exceeds the model's context {context}; set "
            f"{next(f for f in _CONTEXT_FIELDS if hasattr(cfg, f))} >= {config.seq_len} in model_overrides"
        )
    return build_model(config.model, seed=config.seed, device=config.device, **overrides)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def train(config: TrainConfig, corpus: Corpus, *, log_every: int = 10) -> TrainResult:
    """Train ``config.model`` on ``corpus``; returns the model (eval mode) and what happened."""
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    use_bf16 = device.type == "cuda" if config.bf16 is None else config.bf16
    model = build_for_corpus(config, corpus).train()
    batches = random_batches(corpus.train, config.batch_size, config.seq_len, seed=config.seed)
    reg: SNLPRegulariser | None = None
    if config.regulariser is not None:
        example, _ = next(
            random_batches(corpus.train, config.batch_size, config.seq_len, seed=config.seed + 1)
        )
        reg = SNLPRegulariser(model, (example.to(device),), config.regulariser)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, **fused
    )
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(
        range(config.steps),
        desc="train" + (" +snlp-reg" if reg else ""),
        disable=not config.progress,
        mininterval=0.5 if sys.stderr.isatty() else 20.0,  # a log file gets a line every 20 s
    )
    for step in bar:
        lr = config.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if reg is None:
                logits, reg_loss, lam = logits_of(model(x)), None, 0.0
            else:
                out = reg(x)
                logits, reg_loss, lam = logits_of(out.output), out.loss, reg.config.weight_at(step)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss = ce if reg_loss is None else ce + lam * reg_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if step % log_every == 0 or step == config.steps - 1:
            row = {"step": step, "lr": lr, "ce": ce.item(), "loss": loss.item()}
            if reg_loss is not None:
                row.update(reg=reg_loss.item(), lam=lam)
            history.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("ce", "reg")})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    windows = eval_windows(corpus.val, config.seq_len, config.eval_windows)
    val = perplexity(model, windows, config.batch_size, device, corpus.val_bytes_per_token)
    return TrainResult(
        model, config, history, seconds, config.steps * config.batch_size * config.seq_len, val
    )
