"""Training a reference model on real text: the plain baseline, the SNLP-aware regulariser,
SNLP-forward fine-tuning (the paper's v2: cross-entropy of the K-iteration SNLP forward itself),
or both.

AdamW (weight decay on matrices only), linear warm-up then cosine decay, gradient clipping,
bf16 autocast on CUDA, a tqdm progress bar. Runs given the same config and seed see the same
initial weights and the same batches, so their difference is the objective alone.

Objectives (``TrainConfig.objective``), the loss of one step:

- "ce": the sequential cross-entropy (the baseline);
- "regulariser": ce + lambda(step) * R, R the regulariser's K=1 trace error (``RegulariserConfig``);
- "snlp-forward": snlp_ce + seq_ce_weight * ce + distill_weight * KL, snlp_ce the cross-entropy of
  the model's output computed through the solve of ``TrainConfig.snlp`` (``SNLPForward``: the
  deployed parallel layers, K and init), KL that of the frozen starting model's sequential
  next-token distribution to the SNLP one (distillation towards the model being fine-tuned);
- "both": the two above added: snlp_ce + seq_ce_weight * ce + lambda(step) * R + distill_weight * KL.

``init_from`` starts from a checkpoint (fine-tuning; the model keeps that checkpoint's config).
``train(model, data, ...)`` fine-tunes a model given directly (an ``nn.Module``, a local
`transformers` folder, ``'module:factory'``) on text read with the model's own tokenizer when
its folder has one (``model_source``); a `transformers` model is trained through ``TokenLogits``
(its cache off) and saved with ``save_pretrained``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SNLPConfig
from ..errors import SNLPConfigError, SNLPUsageError
from ..models import MODEL_NAMES, build_model, model_config
from .data import Corpus, eval_windows, load_corpus, random_batches
from .evaluate import logits_of, perplexity
from .hf_folder import check_vocab, is_transformers_model, save_transformers, token_model
from .model_source import ModelSource, resolve_model
from .regulariser import RegulariserConfig, SNLPRegulariser
from .snlp_forward import SNLPForward

_CONTEXT_FIELDS = ("sequence_len", "block_size", "max_position_embeddings", "n_positions")
Objective = Literal["ce", "regulariser", "snlp-forward", "both"]
OBJECTIVES: tuple[str, ...] = ("ce", "regulariser", "snlp-forward", "both")


@dataclass
class TrainConfig:
    """One training run.

    objective: what the loss is (module docstring). None: "regulariser" when ``regulariser`` is
        given, else "ce" (how callers that predate ``objective`` asked for the two).
    regulariser: the regulariser of "regulariser" / "both"; None there means
        ``RegulariserConfig()`` (the paper's recipe). Its ``ramp_steps=None`` becomes
        ``reg_ramp_fraction * steps``.
    snlp: the deployed solve trained through by "snlp-forward" / "both" (parallel layers, K,
        init "h0" or "batch_fwd", stages); None means ``SNLPConfig()`` (every layer, K=1, h0).
    seq_ce_weight: weight of the sequential cross-entropy; None: 1.0, except 0.0 for
        "snlp-forward".
    distill_weight: weight of KL(teacher || SNLP), teacher = the frozen starting model run
        sequentially ("snlp-forward" / "both" only; 0 builds no teacher).
    init_from: a checkpoint (``save_checkpoint``) to start from instead of a fresh model; the
        model, its config and its vocabulary are the checkpoint's (``model`` and
        ``model_overrides`` must agree with it or be left out), and the corpus must use the
        checkpoint's tokenizer.
    zero_init_out: build nanochat-family models with zero output projections (nanochat's init;
        ``model_overrides={"zero_init_out": False}`` or False here keeps them random).
    reg_ramp_fraction: the regulariser's lambda ramp, as a share of ``steps``, when its
        ``ramp_steps`` is None (the paper: 20%).
    """

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
    objective: Objective | None = None
    snlp: SNLPConfig | None = None
    seq_ce_weight: float | None = None
    distill_weight: float = 0.0
    init_from: str | Path | None = None
    reg_ramp_fraction: float = 0.2
    zero_init_out: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"TrainConfig.warmup_steps must be in [0, steps], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.objective is None:
            self.objective = "regulariser" if self.regulariser is not None else "ce"
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective in ("regulariser", "both") and self.regulariser is None:
            self.regulariser = RegulariserConfig()
        if self.objective in ("ce", "snlp-forward") and self.regulariser is not None:
            raise ValueError(
                f"TrainConfig.regulariser is set but objective={self.objective!r} does not use it "
                "(objective 'regulariser' or 'both' does)"
            )
        if self.objective in ("snlp-forward", "both"):
            if self.snlp is None:
                self.snlp = SNLPConfig()
            if not isinstance(self.snlp, SNLPConfig):
                raise ValueError(f"TrainConfig.snlp must be an SNLPConfig, got {type(self.snlp).__name__}")
        elif self.snlp is not None:
            raise ValueError(
                f"TrainConfig.snlp is set but objective={self.objective!r} does not use it "
                "(objective 'snlp-forward' or 'both' does)"
            )
        if self.seq_ce_weight is not None and not self.seq_ce_weight >= 0:
            raise ValueError(f"TrainConfig.seq_ce_weight must be >= 0, got {self.seq_ce_weight!r}")
        if not self.distill_weight >= 0:
            raise ValueError(f"TrainConfig.distill_weight must be >= 0, got {self.distill_weight!r}")
        if self.distill_weight > 0 and self.objective not in ("snlp-forward", "both"):
            raise ValueError("TrainConfig.distill_weight needs objective 'snlp-forward' or 'both'")
        if not 0.0 <= self.reg_ramp_fraction <= 1.0:
            raise ValueError(f"TrainConfig.reg_ramp_fraction must be in [0, 1], got {self.reg_ramp_fraction}")

    @property
    def seq_weight(self) -> float:
        """The sequential cross-entropy's weight in the loss (``seq_ce_weight`` resolved)."""
        if self.seq_ce_weight is not None:
            return float(self.seq_ce_weight)
        return 0.0 if self.objective == "snlp-forward" else 1.0

    def regulariser_config(self) -> RegulariserConfig | None:
        """The regulariser used, its ramp resolved (``reg_ramp_fraction`` of the steps when unset)."""
        reg = self.regulariser
        if reg is None or reg.ramp_steps is not None:
            return reg
        return dataclasses.replace(reg, ramp_steps=round(self.reg_ramp_fraction * self.steps))

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
    history: list[dict[str, float]]  # one row per step: lr, loss, ce / reg / lam / snlp_ce / kl, grad_norm
    seconds: float
    tokens: int
    val: dict[str, float]  # final held-out losses: sequential ce / ppl / bpb (and snlp_* for snlp objectives)
    model_name: str = ""  # the registry name (the checkpoint's with init_from), for save_checkpoint
    source: ModelSource | None = None  # the model given to train(model, ...), None for a registry model
    tokenizer: Any = None  # the corpus's: what save() records when given none

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "tokens": self.tokens,
            "val": self.val,
            "last": self.history[-1],
        }

    def save(self, path: str | Path, *, tokenizer: Any = None, **meta: Any) -> Path:
        """``save_checkpoint(path, model, model_name, tokenizer=..., train=<config>, result=<summary>, **meta)``;
        a `transformers` model: ``save_pretrained`` into the folder ``path`` with its tokenizer files
        and the same record (``hf_folder.save_transformers``). ``tokenizer`` defaults to the
        training corpus's."""
        from .checkpoint import save_checkpoint

        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        record = json.loads(json.dumps(dataclasses.asdict(self.config), default=str))
        if is_transformers_model(self.model):
            return save_transformers(
                path,
                self.model,
                tokenizer=tokenizer,
                tokenizer_source=self.source.folder if self.source is not None else None,
                source=self.model_name,
                train=record,
                result=self.summary(),
                **meta,
            )
        return save_checkpoint(
            path,
            self.model,
            self.model_name,
            tokenizer=tokenizer,
            train=record,
            result=self.summary(),
            **meta,
        )


def build_for_corpus(config: TrainConfig, corpus: Corpus) -> nn.Module:
    """The named model with its vocabulary sized to the tokenizer and its context checked
    (nanochat-family models with zero output projections unless told otherwise)."""
    overrides = dict(config.model_overrides)
    vocab = corpus.tokenizer.vocab_size
    overrides.setdefault("vocab_size", vocab)
    if overrides["vocab_size"] < vocab:
        raise ValueError(f"vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {vocab}")
    if "zero_init_out" in {f.name for f in dataclasses.fields(model_config(config.model))}:
        overrides.setdefault("zero_init_out", config.zero_init_out)
    cfg = model_config(config.model, **overrides)
    _check_context(cfg, config.seq_len)
    return build_model(config.model, seed=config.seed, device=config.device, **overrides)


def _check_context(cfg: Any, seq_len: int, where: str = "in model_overrides") -> None:
    field = next((f for f in _CONTEXT_FIELDS if isinstance(getattr(cfg, f, None), int)), None)
    if field is not None and getattr(cfg, field) < seq_len:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's context {getattr(cfg, field)}; set {field} >= {seq_len} "
            f"{where}, or a shorter seq_len"
        )


def load_for_corpus(config: TrainConfig, corpus: Corpus) -> tuple[nn.Module, str]:
    """The ``init_from`` checkpoint's model (and registry name), checked against the corpus."""
    from .checkpoint import load_checkpoint, read_checkpoint_info

    assert config.init_from is not None
    info = read_checkpoint_info(config.init_from)
    name, saved = info["model"], info["model_config"]
    if config.model != name:
        warnings.warn(
            f"TrainConfig.model={config.model!r} ignored: init_from is a {name!r} checkpoint", stacklevel=3
        )
    conflicts = {k: v for k, v in config.model_overrides.items() if k in saved and saved[k] != v}
    unknown = sorted(set(config.model_overrides) - set(saved))
    if conflicts or unknown:
        raise ValueError(
            f"model_overrides {sorted(conflicts) + unknown} disagree with the init_from checkpoint's config "
            f"({ {k: saved.get(k) for k in sorted(conflicts)} }): a fine-tuned model keeps its config"
        )
    spec = info.get("tokenizer")
    if spec is not None and spec != corpus.tokenizer.to_json():
        raise ValueError(
            "the corpus tokenizer is not the init_from checkpoint's: build the corpus with "
            "load_corpus(..., tokenizer=checkpoint_tokenizer(init_from))"
        )
    vocab = corpus.tokenizer.vocab_size
    if saved.get("vocab_size", vocab) < vocab:
        raise ValueError(
            f"the checkpoint's vocab_size={saved['vocab_size']} is smaller than the tokenizer's {vocab}"
        )
    _check_context(model_config(name, **saved), config.seq_len)
    return load_checkpoint(config.init_from, device=config.device), name


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


DataSpec = Corpus | str | Path | Sequence[str | Path] | None


def train(
    model: TrainConfig | ModelSource | nn.Module | str | Path,
    data: DataSpec = None,
    config: TrainConfig | None = None,
    *,
    log_every: int = 10,
    data_options: dict[str, Any] | None = None,
    **fields: Any,
) -> TrainResult:
    """Train, and return the model (eval mode) and what happened. Two ways to call it:

    - ``train(TrainConfig(model="nanochat-tiny", ...), corpus)``: a registry model from scratch
      (or ``init_from`` a checkpoint);
    - ``train(model, data, config=None, **TrainConfig fields)``: fine-tune ``model`` as given, in
      place (an ``nn.Module``, a local `transformers` folder or config.json, ``'module:factory'``,
      a resolved ``ModelSource``; a registry name trains that model from scratch). ``data``: a
      ``Corpus``, or files/folders of text (``load_corpus(data, **data_options)``, e.g.
      ``{"suffix": ".txt"}``) read with the folder's own tokenizer when it has one, else as bytes.

    ``history`` holds one row per step (values are read back from the device every ``log_every``
    steps, so logging costs no per-step synchronisation)."""
    source: ModelSource | None = None
    if isinstance(model, TrainConfig):
        if config is not None or fields:
            raise SNLPUsageError("train(TrainConfig, corpus) takes no second config or TrainConfig fields")
        config = model
    else:
        if config is not None and fields:
            raise SNLPUsageError(
                f"train(model, data, config) takes config or TrainConfig fields, not both ({sorted(fields)})"
            )
        if config is None:  # a short fine-tune warms up over at most its steps, as the CLI does
            fields.setdefault(
                "warmup_steps", min(TrainConfig.warmup_steps, fields.get("steps", TrainConfig.steps))
            )
            config = TrainConfig(**fields)
        if isinstance(model, (str, Path)) and str(model) in MODEL_NAMES:
            config = dataclasses.replace(config, model=str(model))
        else:
            if config.init_from is not None:
                raise SNLPUsageError(
                    "train(model, ...) fine-tunes the model given: leave TrainConfig.init_from unset"
                )
            source = model if isinstance(model, ModelSource) else resolve_model(model, seed=config.seed)
            config = dataclasses.replace(config, model=source.name)
    if not isinstance(data, Corpus):
        own = source.tokenizer if source is not None else None
        sources = None if data is None else [data] if isinstance(data, (str, Path)) else data
        data = load_corpus(sources, **{"tokenizer": own or "bytes", **(data_options or {})})
    return _train(config, data, source, log_every)


def _model_for(config: TrainConfig, corpus: Corpus, source: ModelSource | None) -> tuple[nn.Module, str]:
    """The model to train and its name, checked against the corpus (vocabulary, context)."""
    if source is None:
        if config.init_from is not None:
            return load_for_corpus(config, corpus)
        return build_for_corpus(config, corpus), config.model
    own = source.tokenizer
    if own is not None and own.to_json() != corpus.tokenizer.to_json():
        raise SNLPConfigError(
            f"{source.name}: the corpus is not tokenised with the model's own tokenizer: pass the text "
            "(files or folders) as data, or load_corpus(..., tokenizer=folder_tokenizer(folder))"
        )
    check_vocab(source.model, corpus.tokenizer, source.name)
    _check_context(getattr(source.model, "config", None), config.seq_len, where="in the model's config")
    return source.model.to(config.device), source.name


def _train(config: TrainConfig, corpus: Corpus, source: ModelSource | None, log_every: int) -> TrainResult:
    from ..progress import progress_bar

    device = torch.device(config.device)
    use_bf16 = device.type == "cuda" if config.bf16 is None else config.bf16
    model, model_name = _model_for(config, corpus, source)
    model = model.train()
    net = token_model(model)  # what is captured and called: token ids -> logits
    batches = random_batches(corpus.train, config.batch_size, config.seq_len, seed=config.seed)
    example, _ = next(random_batches(corpus.train, config.batch_size, config.seq_len, seed=config.seed + 1))
    example = example.to(device)
    reg_config = config.regulariser_config()
    reg = SNLPRegulariser(net, (example,), reg_config) if reg_config is not None else None
    snlp = SNLPForward(net, (example,), config.snlp) if config.snlp is not None else None
    teacher = None
    if config.distill_weight > 0:
        teacher = copy.deepcopy(net).eval().requires_grad_(False)
    seq_weight = config.seq_weight
    need_seq = reg is None and (seq_weight > 0 or snlp is None)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, **fused
    )
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, float]] = []
    pending: list[tuple[int, float, float, dict[str, torch.Tensor]]] = []  # rows not yet read back
    start = time.perf_counter()
    # a terminal gets a tqdm bar, a log file a whole line every 20 s and at each tenth of the steps
    bar = progress_bar(range(config.steps), desc=f"train {config.objective}", disable=not config.progress)
    for step in bar:
        lr = config.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        terms: dict[str, torch.Tensor] = {}
        lam = 0.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = None
            if reg is not None:
                out = reg(x)
                logits, lam = logits_of(out.output), reg.config.weight_at(step)
                terms["reg"] = out.loss
            elif need_seq:
                logits = logits_of(net(x))
            if logits is not None:
                terms["ce"] = _cross_entropy(logits, y)
            if snlp is not None:
                snlp_logits = logits_of(snlp(x))
                terms["snlp_ce"] = _cross_entropy(snlp_logits, y)
                if teacher is not None:
                    with torch.no_grad():
                        target = logits_of(teacher(x))
                    terms["kl"] = _kl(target, snlp_logits)
        loss = sum(
            (
                w * terms[k]
                for k, w in (
                    ("ce", seq_weight),
                    ("reg", lam),
                    ("snlp_ce", 1.0),
                    ("kl", config.distill_weight),
                )
                if k in terms and w != 0
            ),
            torch.zeros((), device=device),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(
            params, config.grad_clip if config.grad_clip > 0 else float("inf")
        )
        opt.step()
        pending.append(
            (
                step,
                lr,
                lam,
                {
                    "loss": loss.detach(),
                    "grad_norm": grad_norm.detach(),
                    **{k: v.detach() for k, v in terms.items()},
                },
            )
        )
        if step % log_every == 0 or step == config.steps - 1:
            for row in _read_back(pending, reg is not None):
                history.append(row)
            pending.clear()
            bar.set_postfix({k: f"{v:.4g}" for k, v in history[-1].items() if k in ("ce", "snlp_ce", "reg")})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    windows = eval_windows(corpus.val, config.seq_len, config.eval_windows)
    val = perplexity(net, windows, config.batch_size, device, corpus.val_bytes_per_token)
    if snlp is not None:
        solved = perplexity(snlp, windows, config.batch_size, device, corpus.val_bytes_per_token)
        val.update({f"snlp_{k}": v for k, v in solved.items()})
    tokens = config.steps * config.batch_size * config.seq_len
    return TrainResult(model, config, history, seconds, tokens, val, model_name, source, corpus.tokenizer)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), in fp32."""
    t = F.log_softmax(teacher_logits.float().reshape(-1, teacher_logits.size(-1)), dim=-1)
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.size(-1)), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _read_back(
    pending: list[tuple[int, float, float, dict[str, torch.Tensor]]], regularised: bool
) -> list[dict[str, float]]:
    """The pending steps' values as history rows, with one device-to-host copy."""
    if not pending:
        return []
    keys = list(pending[0][3])
    values = torch.stack([torch.stack([row[3][k].float() for k in keys]) for row in pending]).cpu().tolist()
    rows = []
    for (step, lr, lam, _), vals in zip(pending, values):
        row: dict[str, float] = {"step": step, "lr": lr, **dict(zip(keys, vals))}
        if regularised:
            row["lam"] = lam
        rows.append(row)
    return rows
