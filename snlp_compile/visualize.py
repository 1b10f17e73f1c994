"""A picture of the layer chain before and after the rewrite, for people who would rather look."""

from __future__ import annotations

from pathlib import Path

from .report import ExplainReport


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'snlp-compile[plot]'") from exc
    return plt


def _elided(names: list[str], keep: int = 10) -> list[str]:
    if len(names) <= keep:
        return names
    return [*names[: keep // 2], f"... {len(names) - keep + 1} more ...", *names[-(keep // 2 - 1) :]]


def draw_chain(report: ExplainReport, path: str | Path, iterations: int | None = None) -> Path:
    """Draw the sequential chain (left) and the layer-parallel solve (right) into a PNG."""
    plt = _require_matplotlib()
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 8))
    for ax in (left, right):
        ax.set_xlim(0, 10)
        ax.set_ylim(0, 100)
        ax.axis("off")

    def box(ax, x, y, w, h, text, color):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3", fc=color, ec="#333333", lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8, wrap=True)

    def arrow(ax, y0, y1, x=5.0):
        ax.add_patch(FancyArrowPatch((x, y0), (x, y1), arrowstyle="-|>", mutation_scale=10, color="#333333"))

    layers = report.layers or []
    parallel = set(report.parallel_layers)
    left.set_title(f"{report.model}: sequential chain ({len(layers)} layers)", fontsize=10)
    shown = _elided(layers, 12)
    y = 94.0
    box(left, 2, y, 6, 3, "prefix (embedding ...)", "#e8e8e8")
    step = min(7.0, 84.0 / (len(shown) + 1))
    for name in shown:
        arrow(left, y - 0.3, y - step + 3.6)
        y -= step
        color = "#cfe3ff" if name in parallel else "#f3f3f3"
        box(left, 2, y, 6, min(3.0, step - 1.5), name, color)
    arrow(left, y - 0.3, y - step + 3.6)
    box(left, 2, y - step, 6, 3, "suffix (final norm, head)", "#e8e8e8")
    lowest = y - step

    if report.refusal:
        right.set_title("not rewritten", fontsize=10)
        right.text(
            5, 60, "REFUSED\n\n" + "\n".join(_wrap(report.refusal, 60)), ha="center", va="center", fontsize=8
        )
        lowest = min(lowest, 40.0)
    else:
        k = iterations if iterations is not None else "K"
        right.set_title(f"SNLP solve: {len(parallel)} layers in parallel, {k} iteration(s)", fontsize=10)
        y = 94.0
        box(right, 2, y, 6, 3, "prefix (embedding ...)", "#e8e8e8")
        seq = [n for n in layers if n not in parallel]
        if seq:
            arrow(right, y - 0.3, y - 4)
            y -= 8
            box(right, 2, y, 6, 4, f"{len(seq)} sequential layers\n({seq[0]} .. {seq[-1]})", "#f3f3f3")
        arrow(right, y - 0.3, y - 6)
        y -= 16
        box(
            right, 1, y, 8, 9,
            f"all {len(parallel)} layers at once\n(one batched body over stacked weights)\n"
            f"{report.parallel_layers[0]} .. {report.parallel_layers[-1]}", "#cfe3ff",
        )  # fmt: skip
        arrow(right, y - 0.3, y - 6)
        y -= 14
        correction = (report.skip or "").split(":")[-1].strip() or "correction"
        box(right, 1, y, 8, 7, "structured Newton correction\n" + "\n".join(_wrap(correction, 46)), "#ffe1c4")
        right.add_patch(
            FancyArrowPatch((9.4, y + 4), (9.4, y + 21), connectionstyle="arc3,rad=-0.5", arrowstyle="-|>",
                            mutation_scale=10, color="#c05000")
        )  # fmt: skip
        right.text(9.9, y + 13, f"x {k}", color="#c05000", fontsize=9)
        arrow(right, y - 0.3, y - 6)
        y -= 14
        readers = "\n".join(_wrap("; ".join(r.split(" reads ")[-1] for r in report.readers[:4]), 50))
        box(right, 2, y, 6, 6, f"solved trace h_1..h_N\nread by: {readers}", "#e0f5e0")
        arrow(right, y - 0.3, y - 5.6)
        y -= 9
        box(right, 2, y, 6, 3, "suffix (final norm, head)", "#e8e8e8")
        if report.skip:
            y -= 7
            right.text(5, y, "\n".join(_wrap("surrogate: " + report.skip, 90)), ha="center", fontsize=7)
        lowest = min(lowest, y)
    bottom = lowest - 3  # no empty band below the lowest box: the figure is as tall as the drawing
    for ax in (left, right):
        ax.set_ylim(bottom, 100)
    fig.set_size_inches(12, max(3.0, 8 * (100 - bottom) / 100 + 0.4))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]
