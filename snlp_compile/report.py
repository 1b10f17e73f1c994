"""The explain() report: what was matched, which surrogate, what runs in parallel, and why not;
and ``PassResult``, what one pass says it did (``passes.infra``), which the report lists."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PassResult:
    """What one pass did: ``changed`` (the graph or the compilation's data), ``counts`` (e.g.
    ``{"fused weights": 1}``) and ``notes`` (decisions the report shows)."""

    changed: bool
    counts: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return ("changed  " if self.changed else "unchanged") + (f"  {counts}" if counts else "")


@dataclass
class ExplainReport:
    model: str
    capture: str = ""
    container: str | None = None
    layers: list[str] = field(default_factory=list)
    parallel_layers: list[str] = field(default_factory=list)
    stages: list[int] = field(default_factory=list)  # layers per stage (SNLPConfig.stages), in order
    skip: str | None = None
    body_ops: dict[str, int] = field(default_factory=dict)
    externals: list[tuple[str, str, str]] = field(default_factory=list)  # (name, mode, shape)
    readers: list[str] = field(default_factory=list)
    # external name -> where its value comes from (a source line of the model, or a size)
    origins: dict[str, str] = field(default_factory=dict)
    config: str = ""
    notes: list[str] = field(default_factory=list)
    refusal: str | None = None
    error: Exception | None = field(default=None, repr=False)  # the refusal, for transform() to raise
    passes: list[tuple[str, PassResult]] = field(default_factory=list)  # what each pass did, in order
    refused_in: str | None = None  # the pass that refused the model
    # wall seconds each pass took: where transform()'s time went
    pass_seconds: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def of(module: object) -> ExplainReport | None:
        """The report transform() attached to the module it returned (``.snlp_report``), if any."""
        report = getattr(module, "snlp_report", None)
        return report if isinstance(report, ExplainReport) else None

    @property
    def rewritten(self) -> bool:
        return self.refusal is None and bool(self.parallel_layers)

    def __str__(self) -> str:
        lines = [f"snlp_compile explain: {self.model}", f"  capture:   {self.capture}"]
        if self.container is not None:
            lines.append(
                f"  layers:    {len(self.layers)} in '{self.container}' ({', '.join(self.layers[:3])}{', ...' if len(self.layers) > 3 else ''})"
            )
        if self.parallel_layers:
            seq = len(self.layers) - len(self.parallel_layers)
            lines.append(
                f"  parallel:  {len(self.parallel_layers)} layers ({self.parallel_layers[0]} .. {self.parallel_layers[-1]}), "
                f"{seq} sequential before them"
            )
        if len(self.stages) > 1:
            sizes = " + ".join(map(str, self.stages))
            lines.append(
                f"  stages:    {len(self.stages)} ({sizes} layers), solved one after another, each from the "
                "previous one's last output; the correction restarts at each"
            )
        if self.skip:
            lines.append(f"  surrogate: {self.skip}")
        if self.body_ops:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.body_ops.items(), key=lambda kv: -kv[1])[:8])
            lines.append(f"  body:      {sum(self.body_ops.values())} ops per layer ({ops})")
        if self.externals:
            lines.append("  layer inputs besides h:")
            width = max(28, *(len(name) for name, _, _ in self.externals))
            shapes = max(len(shape) for _, _, shape in self.externals)
            for name, mode, shape in self.externals:
                origin = self.origins.get(name, "")
                lines.append(f"    {name:<{width}} {mode:<8} {shape:<{shapes}}  {origin}".rstrip())
        if self.readers:
            lines.append("  hidden-state readers outside the chain (fed from the solved trace):")
            lines.extend(f"    {r}" for r in self.readers)
        if self.config:
            lines.append(f"  config:    {self.config}")
        for note in self.notes:
            lines.append(f"  note:      {note}")
        if self.passes or self.refused_in:
            lines.append("  passes:")
            width = max(len(name) for name in [*(n for n, _ in self.passes), self.refused_in or ""])
            for name, result in self.passes:
                took = self.pass_seconds.get(name)
                lines.append(
                    f"    {name:<{width}}  {result.describe()}"
                    + (f"  ({took:.2f} s)" if took is not None else "")
                )
            if self.refused_in:
                lines.append(f"    {self.refused_in:<{width}}  refused")
        if self.refusal:
            lines.append(f"  REFUSED:   {self.refusal}")
        else:
            lines.append("  result:    rewritten" if self.rewritten else "  result:    unchanged")
        return "\n".join(lines)
