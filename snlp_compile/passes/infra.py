"""Pass infrastructure in the style of torch.fx.passes.infra: every pass has one shape.

A pass is a function ``(state) -> PassResult``: it reads and writes the fields of the state it
works on (for ``transform()``: ``pipeline.Compilation``, the captured graph, the LayerChain, the
SolvePlan, the report) and says what it did: whether it changed anything, counts, notes.
``PassManager`` runs a list of passes (the pipeline is data: ``snlp_compile.pipeline``), checks
an invariant after each, stops at a refusal (returned, not raised) and names the pass an
unexpected error came from. Every result is kept, in order, with the seconds its pass took;
``explain()`` lists them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..errors import SNLPRefusal
from ..report import PassResult

State = TypeVar("State")
Pass = Callable[[State], PassResult]


@dataclass(frozen=True)
class PassRecord:
    name: str
    result: PassResult
    seconds: float = 0.0  # wall time of the pass and the check after it


def pass_name(p: Pass) -> str:
    return getattr(p, "__name__", type(p).__name__).removesuffix("_pass")


@dataclass
class PassRun:
    """The passes that ran and what each did; the refusal that stopped them, if one did."""

    records: list[PassRecord] = field(default_factory=list)
    refusal: SNLPRefusal | None = None
    refused_in: str | None = None


class PassManager(Generic[State]):
    """Runs passes in order over one state; ``check(state)`` runs after each (e.g. a graph lint).

    A refusal (``SNLPRefusal``) ends the run and is returned, not raised; any other error is
    raised with a note naming the pass it came from and the passes before it."""

    def __init__(
        self, passes: Sequence[Callable[[State], PassResult]], check: Callable[[State], None] | None = None
    ) -> None:
        self.passes = list(passes)
        self.check = check

    def run(self, state: State) -> PassRun:
        run = PassRun()
        for p in self.passes:
            name = pass_name(p)
            started = time.perf_counter()
            try:
                result = p(state)
                if self.check is not None:
                    self.check(state)
            except SNLPRefusal as refusal:
                run.refusal, run.refused_in = refusal, name
                break
            except Exception as error:
                done = [r.name for r in run.records]
                if hasattr(error, "add_note"):
                    error.add_note(f"(in the '{name}' pass, after {done or 'no other pass'})")
                raise
            run.records.append(PassRecord(name, result, time.perf_counter() - started))
        return run


__all__ = ["Pass", "PassManager", "PassRecord", "PassResult", "PassRun", "pass_name"]
