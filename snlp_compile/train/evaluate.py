"""Held-out perplexity and bits per byte of a model run sequentially and through SNLP solves.

Each solve setting (K, how many layers parallel, init, stages) is the model transformed by
``snlp_compile.transform``; settings that differ only in K share one transform (K is the solve's
iteration count, as ``solve_trace`` sets it). A `transformers` model is evaluated as
``hf_folder.TokenLogits`` (its cache off: a ``DynamicCache`` cannot be captured). Results are rows of plain dicts, rendered as a
markdown table and a plot of perplexity against K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..api import analyse
from ..api import transform as snlp_transform
from ..config import SNLPConfig
from ..solve.handle import solve_handle
from .decode_eval import DecodeSetting, decode_perplexity
from .hf_folder import token_model


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (Hugging Face) or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


@torch.no_grad()
def perplexity(
    model: Callable[[torch.Tensor], Any],
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    bytes_per_token: float,
) -> dict[str, float]:
    """Mean next-token cross entropy over ``windows`` (n, T + 1) -> ce (nats), ppl, bits per byte."""
    if isinstance(model, nn.Module):
        model = token_model(model)
    total, count = 0.0, 0
    for i in range(0, windows.size(0), batch_size):
        win = windows[i : i + batch_size].to(device)
        logits = logits_of(model(win[:, :-1])).float()
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), win[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += win[:, 1:].numel()
    ce = total / count
    return {"ce": ce, "ppl": math.exp(ce), "bpb": ce / math.log(2) / bytes_per_token}


class UnfitSetting(ValueError):
    """A solve setting the model cannot take (a parallel count out of range, or one its wide layers do
    not split): the caller's misuse, which the command line reports as a usage error (exit 2)."""


@dataclass(frozen=True)
class SolveSetting:
    """One SNLP configuration to evaluate. parallel: "all", "half" (of the parallelisable layers) or a count;
    stages: SNLPConfig.stages; fused_layers: SNLPConfig.fused_layers (wide layers of M: the
    function of a model trained fused)."""

    iterations: int
    parallel: int | str = "all"
    init: str = "h0"
    stages: int = 1
    fused_layers: int = 1


def parallel_count(parallel: int | str, available: int) -> int:
    if parallel == "all":
        return available
    if parallel == "half":
        return max(2, available // 2)
    if isinstance(parallel, int) and 2 <= parallel <= available:
        return parallel
    raise UnfitSetting(f"parallel must be 'all', 'half' or an int in [2, {available}], got {parallel!r}")


def evaluate_model(
    model: nn.Module,
    windows: torch.Tensor,
    settings: Sequence[SolveSetting],
    *,
    batch_size: int,
    device: torch.device | str,
    bytes_per_token: float,
    label: str,
    progress: Callable[[dict[str, Any]], None] | None = None,
    decode: bool = False,
    skip_unfit: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows: the sequential model, then every setting, each with ce, ppl, bpb and the gap to sequential
    (``progress`` is called with each row as it is done). ``decode``: each setting measured on the
    KV-cached decode step, teacher-forced token by token (``decode_eval.decode_perplexity``: the
    path that is timed; init "warm" exists only there) instead of the full-sequence forward; the
    model must decode (``Decoder``). A setting whose parallel layers (counted on this model's chain:
    "half" need not be a multiple of M) do not split into wide layers of its ``fused_layers`` is an
    error, or, given ``skip_unfit``, reported to it and left out."""
    raw = model.eval().to(device)  # (the decode step runs the model itself, not its token wrapper)
    model = token_model(raw)
    if windows.size(0) > batch_size:  # whole batches only, so a static-shape capture fits every batch
        windows = windows[: windows.size(0) // batch_size * batch_size]
    example = (windows[:batch_size, :-1].to(device),)
    _, chain, report = analyse(model, example, SNLPConfig())
    if chain is None:
        raise ValueError(f"{label}: transform() refuses the model: {report.refusal}")
    available = chain.num_parallel
    groups: dict[tuple[int, str, int, int], list[int]] = {}
    for s in settings:
        try:
            count = parallel_count(s.parallel, available)
        except UnfitSetting as exc:
            raise UnfitSetting(f"{label}: {exc}") from None
        if count % s.fused_layers:
            unfit = f"{label}: {count} parallel layers do not split into wide layers of {s.fused_layers}"
            if skip_unfit is None:
                raise UnfitSetting(f"{unfit} (fused_layers must divide the parallel layers)")
            skip_unfit(f"{unfit}: skipped")
            continue
        groups.setdefault((count, s.init, s.stages, s.fused_layers), []).append(s.iterations)
    seq = perplexity(model, windows, batch_size, device, bytes_per_token)
    rows: list[dict[str, Any]] = [
        {"model": label, "mode": "sequential", "K": None, "parallel": 0, "init": None, **seq, "gap": 0.0}
    ]
    if progress is not None:
        progress(rows[0])

    def add(res: dict[str, float], k: int, n_par: int, init: str, stages: int, fused: int) -> None:
        row = {"model": label, "mode": "snlp", "K": k, "parallel": n_par, "init": init, **res}
        row.update(stages=stages, fused_layers=fused, path="decode" if decode else "forward")
        rows.append({**row, "gap": res["ppl"] / seq["ppl"] - 1.0})
        if progress is not None:
            progress(rows[-1])

    for (n_par, init, stages, fused), ks in groups.items():
        if decode:
            if stages != 1:
                raise ValueError("decode-path perplexity solves one stage (stages=1)")
            par = None if n_par >= available else n_par
            grid = [DecodeSetting(k, par, init, fused) for k in sorted(set(ks))]
            for r in decode_perplexity(raw, windows, grid, bytes_per_token=bytes_per_token):
                add(
                    {"ce": r.ce, "ppl": r.ppl, "bpb": r.bpb}, r.setting.iterations or 0, n_par, init, 1, fused
                )
            continue
        fast = snlp_transform(
            model, example, parallel_layers=n_par, init=init, stages=stages, fused_layers=fused
        )
        solve = solve_handle(fast)
        for k in sorted(set(ks)):
            solve.iterations = k
            add(perplexity(fast, windows, batch_size, device, bytes_per_token), k, n_par, init, stages, fused)
        del fast
    rows[0]["gap"] = 0.0
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], layers: dict[str, int] | None = None) -> str:
    """One line per row: model, setting, ppl, bits per byte, perplexity relative to the model's own sequential run."""
    lines = [
        "| model | setting | K | parallel layers | init | ppl | bits/byte | vs own sequential |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = (layers or {}).get(r["model"])
        par = (
            "-"
            if r["mode"] == "sequential"
            else (f"{r['parallel']}/{total}" if total else str(r["parallel"]))
        )
        setting = r["mode"] + (" decode" if r.get("path") == "decode" else "")
        setting += f" S={r['stages']}" if (r.get("stages") or 1) > 1 else ""
        setting += f" F={r['fused_layers']}" if (r.get("fused_layers") or 1) > 1 else ""
        lines.append(
            f"| {r['model']} | {setting} | {r['K'] if r['K'] is not None else '-'} | {par} | {r['init'] or '-'} | "
            f"{r['ppl']:.3f} | {r['bpb']:.4f} | {r['gap'] * 100:+.2f}% |"
        )
    return "\n".join(lines) + "\n"


def plot_ppl_vs_k(
    rows: Sequence[dict[str, Any]], path: str | Path, title: str = "", zoom: float = 1.25
) -> Path:
    """Perplexity against K, one line per (model, parallel layers); dashed: each model's sequential run.

    Left: every point on a log scale (an unregularised model at small K can be off by orders of
    magnitude). Right: the same, linear, cut at ``zoom`` x the worst sequential perplexity, where
    the differences the targets are about (a few percent) are visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=130)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ks = sorted({r["K"] for r in rows if r["K"] is not None})
    for ax in axes:
        for i, m in enumerate(models):
            color = colors[i % len(colors)]
            mine = [r for r in rows if r["model"] == m]
            for r in mine:
                if r["mode"] == "sequential":
                    ax.axhline(r["ppl"], color=color, linestyle="--", linewidth=1, label=f"{m}: sequential")
            snlp = [r for r in mine if r["mode"] == "snlp"]

            def key(r: dict[str, Any]) -> tuple[int, str, int, int]:
                return r["parallel"], r["init"], r.get("stages") or 1, r.get("fused_layers") or 1

            keys = sorted({key(r) for r in snlp}, reverse=True)
            for j, (par, init, stages, fused) in enumerate(keys):
                pts = sorted((r["K"], r["ppl"]) for r in snlp if key(r) == (par, init, stages, fused))
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="os^v"[j % 4],
                    color=color,
                    linestyle="-" if j == 0 else ":",
                    label=f"{m}: {par} parallel, init {init}"
                    + (f", {stages} stages" if stages > 1 else "")
                    + (f", wide layers of {fused}" if fused > 1 else ""),
                )
        ax.set_xlabel("K (SNLP iterations)")
        ax.set_xticks(ks)
        ax.grid(True, which="both", alpha=0.3)
    left, right = axes
    left.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    left.yaxis.set_major_formatter(plain)
    every = [r["ppl"] for r in rows]
    wide = bool(every) and max(every) / min(every) > 10  # minor labels only where they do not collide
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter() if wide else plain)
    left.set_ylabel("held-out perplexity")
    left.legend(fontsize=6.5)
    seq = [r["ppl"] for r in rows if r["mode"] == "sequential"]
    if seq:  # the zoom never spans more than the main panel
        lo, hi = left.get_ylim()
        right.set_ylim(max(0.98 * min(seq), lo), min(zoom * max(seq), hi))
    clipped = bool(seq) and zoom * max(seq) < left.get_ylim()[1]
    right.set_title(f"zoom: up to {zoom:g}x sequential" if clipped else "linear scale", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
