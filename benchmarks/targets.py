"""Issue 6's speed targets, read off benchmark result files: measured, required, and reachable.

    python -m benchmarks targets benchmarks/results/decode_05b.json \
        benchmarks/results/decode_d20.json benchmarks/results/forward_05b.json --name targets

For each target (a ratio against the best sequential variant of the same run) it prints and saves
the best SNLP time at that K, the time the target asks for, and the ceiling: the best sequential
time over the least time any step at that K can take (``common.layer_parallel_passes`` passes over
the layers, each at the bytes floor, or for the forward at the larger of the bytes and FLOP
floors). A target above its ceiling cannot be met against that baseline by any layer-parallel
step, however it is written ("infeasible"); "required / floor at K" says how close to the floor
it asks a step to run. Result files without a row's floor at K get it recomputed from their
floors and notes.

The sequential baseline is the fastest row that computes the sequential model: the model as
written (``seq ...``) or the compiler's exact sequential mode (``snlp K=1 S=N``, as many stages as
layers; ``common.computes_sequentially``).

By default each target is read off the first file that has it (one run: the issue's "same run").
``--strongest-baseline`` pools the files of a regime instead: the fastest sequential and the
fastest SNLP time of any of them. Inductor's max-autotune picks different GEMM kernels from run
to run (docs/benchmark-history.md), so a ratio from one run can flatter; the pooled one cannot.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import common


@dataclass(frozen=True)
class Target:
    regime: str  # "decode" or "forward"
    shape: str  # the shape key, e.g. "0.5b"
    case: str  # e.g. "b1 ctx=1024"
    k: int
    ratio: float | None  # against the best sequential variant; None: a floor target
    max_x_floor: float | None = None  # K=1 within this multiple of the bytes floor


# docs/DESIGN.md section 3 / issue 6, item 2 (ratios) and item 3 (bytes floor)
TARGETS = [
    Target("decode", "d20", "b1 ctx=1024", 1, 4.0),
    Target("decode", "0.5b", "b1 ctx=1024", 1, 8.0),
    Target("decode", "d20", "b1 ctx=1024", 2, 1.9),
    Target("decode", "0.5b", "b1 ctx=1024", 2, 4.0),
    Target("forward", "0.5b", "b1 T=2048", 1, 1.7),
    Target("decode", "d20", "b1 ctx=1024", 1, None, 1.5),
    Target("decode", "0.5b", "b1 ctx=1024", 1, None, 1.5),
]

# families that are "the compiler's output at K" (staged configurations are another K's work)
SNLP_FAMILIES = ("snlp", "snlp-deferred", "snlp-einsum")


def _layers(shape_label: str) -> int:
    m = re.search(r"L=(\d+)", shape_label)
    if not m:
        raise SystemExit(f"shape '{shape_label}': no layer count (L=...) in its label")
    return int(m.group(1))


def _flop_floor(note: str) -> float | None:
    m = re.search(r"FLOP floor ([0-9.]+) ms", note or "")
    return float(m.group(1)) if m else None


def _floor_at_k(target: Target, payload: dict[str, Any], best: dict[str, Any]) -> float | None:
    """The floor at K of ``best``'s row, from a result file that does not record it."""
    floor = best.get("floor_ms")
    note = payload.get("case_notes", {}).get(f"{best['shape']} | {target.case}", "")
    one_pass = max(floor or 0.0, _flop_floor(note) or 0.0) if target.regime == "forward" else floor
    return one_pass * common.layer_parallel_passes(target.k, _layers(best["shape"])) if one_pass else None


def evaluate(target: Target, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The target's row from one result file, or None when the file has no such case."""
    recs = [
        r
        for r in payload["records"]
        if r["shape"].split(" ")[0] == target.shape and r["case"] == target.case and r.get("median_ms")
    ]
    seq = [
        r
        for r in recs
        if common.computes_sequentially(
            r["family"], r["k"], common.stages_of(r.get("extra")), _layers(r["shape"])
        )
    ]
    snlp = [r for r in recs if r["family"] in SNLP_FAMILIES and r["k"] == target.k]
    if not seq or not snlp:
        return None
    fastest_seq, best = min(seq, key=lambda r: r["median_ms"]), min(snlp, key=lambda r: r["median_ms"])
    best_seq = fastest_seq["median_ms"]
    floor = best.get("floor_ms")
    # results carry the row's floor at K; older ones get it recomputed from the layer count in
    # the shape label and, for the forward, the FLOP floor in the case note
    k_floor = best.get("k_floor_ms") or _floor_at_k(target, payload, best)
    row: dict[str, Any] = {
        "target": (
            f"{target.shape} {target.regime} {target.case} K={target.k} "
            + (f">= {target.ratio}x" if target.ratio else f"within {target.max_x_floor}x of the bytes floor")
        ),
        "best_seq_ms": best_seq,
        "best_seq_variant": fastest_seq["variant"],
        "snlp_variant": best["variant"],
        "snlp_ms": best["median_ms"],
        "ratio": best_seq / best["median_ms"],
        "floor_at_k_ms": k_floor,
        "ceiling": best_seq / k_floor if k_floor else None,
    }
    if target.ratio is not None:
        required = best_seq / target.ratio
        row["required_ms"] = required
        row["required_x_floor_at_k"] = required / k_floor if k_floor else None
        met = row["ratio"] >= target.ratio
        feasible = row["ceiling"] is None or row["ceiling"] >= target.ratio
        row["status"] = "met" if met else ("missed" if feasible else "infeasible")
    elif not floor:  # (a CPU run measures no bandwidth)
        row["status"] = "no bytes floor in the results"
    else:
        x = best["median_ms"] / floor
        row.update(required_ms=floor * target.max_x_floor, x_floor=x)
        row["status"] = "met" if x <= target.max_x_floor else "missed"
    return row


def _pooled(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One payload holding the records and case notes of several runs of one regime."""
    notes: dict[str, str] = {}
    for pl in payloads:
        notes.update(pl.get("case_notes", {}))
    return {
        "regime": payloads[0].get("regime"),
        "case_notes": notes,
        "records": [r for pl in payloads for r in pl["records"]],
    }


def _unless_plain(variant: str | None) -> str:
    """The best sequential variant's name where it is not the model as written (``seq ...``)."""
    return f" ({variant})" if variant and not variant.startswith("seq ") else ""


def markdown(rows: list[dict[str, Any]], sources: list[str], pooled: bool = False) -> str:
    how = "the fastest of any of" if pooled else "from"
    header = "target,best seq ms,SNLP ms (variant),ratio,required ms,floor at K ms,ceiling,"
    header += "required / floor at K,status"
    cells = [
        [
            r["target"],
            f"{r['best_seq_ms']:.3f}{_unless_plain(r.get('best_seq_variant'))}",
            f"{r['snlp_ms']:.3f} ({r['snlp_variant']})",
            f"{r['ratio']:.2f}x",
            common.fmt(r.get("required_ms"), ".3f"),
            common.fmt(r["floor_at_k_ms"], ".3f"),
            f"{common.fmt(r['ceiling'], '.2f')}x",
            common.fmt(r.get("required_x_floor_at_k"), ".2f"),
            r["status"],
        ]
        for r in rows
    ]
    title = f"## Issue 6 targets, {how} " + ", ".join(f"`{s}`" for s in sources)
    return "\n".join([title, "", *common.md_table(header.split(","), cells)]) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The ratio targets as bars: measured ratio, the target (a tick) and the ceiling (a diamond)."""
    plt = common.pyplot()
    ratio_rows = [r for r in rows if "required_x_floor_at_k" in r]
    if plt is None or not ratio_rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(ratio_rows) + 1.2))
    y = list(range(len(ratio_rows)))
    colors = {"met": "tab:green", "missed": "tab:orange", "infeasible": "tab:red"}
    ax.barh(y, [r["ratio"] for r in ratio_rows], color=[colors[r["status"]] for r in ratio_rows], alpha=0.7)
    goal = [r["best_seq_ms"] / r["required_ms"] for r in ratio_rows]  # (required = best seq / target)
    ax.scatter(goal, y, marker="|", s=400, color="black", label="target", zorder=3)
    ax.scatter(
        [r["ceiling"] or 0 for r in ratio_rows], y, marker="D", color="tab:blue", label="ceiling", zorder=3
    )
    ax.set_yticks(
        y, [r["target"].replace(" b1", "").replace(" ctx=1024", "") for r in ratio_rows], fontsize=8
    )
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the best sequential variant (bar colour: met / missed / infeasible)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="result JSON files of decode.py / forward.py")
    p.add_argument("--out", default=None, help=common.OUT_HELP)
    p.add_argument("--name", default="targets")
    pool = "pool the files of each regime: the fastest sequential and SNLP times of any run"
    p.add_argument("--strongest-baseline", action="store_true", help=pool)
    args = p.parse_args(argv)
    payloads = []
    for path in args.results:
        try:
            payloads.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: not a readable result file ({exc})") from None
    if args.strongest_baseline:
        payloads = [
            _pooled([pl for pl in payloads if pl.get("regime") == r])
            for r in {pl.get("regime") for pl in payloads}
        ]
    rows = []
    for target in TARGETS:
        evaluated = (evaluate(target, pl) for pl in payloads if pl.get("regime") == target.regime)
        found = [r for r in evaluated if r is not None]
        rows.extend(found[:1])
        if not found:
            what = f"{target.shape} {target.regime} {target.case} K={target.k}"
            print(f"(no result for {what} in these files)", file=sys.stderr)
    out = common.out_dir_from(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, [Path(s).name for s in args.results], pooled=args.strongest_baseline)
    (out / f"{args.name}.md").write_text(text)
    payload = {"sources": args.results, "strongest_baseline": args.strongest_baseline}
    payload |= {"targets": [asdict(t) for t in TARGETS], "rows": rows}
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    plot(rows, out / f"{args.name}.png")
    print(text)
    return 0
