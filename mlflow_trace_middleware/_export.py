"""The export contract between the sink and its exporters: what an exporter is given (a batch of
encoded spans of one experiment), what it answers (`ExportResult`), the sink's counters, and the
readings of MLflow's refusals both exporters share. In its own module so the exporters
(`_otlp`, `_store`, the public `testing` helpers) need not import the sink itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from . import _log
from ._encoding import EncodedSpan


@dataclass(frozen=True)
class ExportResult:
    """What became of one batch: delivered, to be retried, to be split, or dropped."""

    delivered: bool
    retry: bool = False
    retry_after: float | None = None
    reason: str = ""
    split: bool = False
    rejected: int = 0
    traces: frozenset[int] = frozenset()  # OpenTelemetry trace ids refused whole

    @classmethod
    def ok(cls, rejected: int = 0) -> ExportResult:
        """Delivered; the server refused `rejected` of the spans (OTLP partial success)."""
        return cls(delivered=True, rejected=rejected)

    @classmethod
    def retry_later(cls, reason: str, retry_after: float | None = None) -> ExportResult:
        return cls(delivered=False, retry=True, retry_after=retry_after, reason=reason)

    @classmethod
    def dropped(cls, reason: str) -> ExportResult:
        return cls(delivered=False, reason=reason)

    @classmethod
    def drop_traces(cls, reason: str, trace_ids: frozenset[int]) -> ExportResult:
        """The server refused these traces (and so the batch): their spans are dropped as
        `reason`, never retried; the rest of the batch is sent again at once."""
        return cls(delivered=False, reason=reason, split=True, traces=trace_ids)

    @classmethod
    def split_batch(cls, reason: str) -> ExportResult:
        """Send the batch again in halves; a single span that gets this is dropped as `reason`."""
        return cls(delivered=False, split=True, reason=reason)


class Exporter(Protocol):
    """Delivers one batch of finished spans that all belong to one experiment; called from the
    sink's worker thread only.

    The spans are encoded (`_encoding.EncodedSpan`): `_encoding.encode` frames them into an OTLP
    request without decoding them, and they offer what exporters read of an SDK `ReadableSpan`
    (`name`, `context`, `parent`, `kind`, `attributes`, `events`, `links`, `status`, times),
    decoded on access. `experiment_id` None means the process's own experiment."""

    def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult: ...

    def shutdown(self) -> None: ...


@dataclass
class SinkStats:
    """Counters of a sink; ``produced == exported + pending + sum(dropped.values())``.

    `claims`: placeholders posted so the server files a trace under its root's experiment before
    a callee writes to it (docs/architecture.md, "Claims"). They are not spans: none of the
    other counters hold them, and a claim that fails loses nothing (its span follows).
    """

    produced: int = 0
    exported: int = 0
    pending: int = 0
    pending_bytes: int = 0
    requests: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    internal_errors: int = 0
    claims: int = 0


# MLflow 3.18 refuses a whole batch when one of its traces lives in another experiment
# (`SqlAlchemyStore._log_spans_once`, answered as 400 INVALID_PARAMETER_VALUE), naming one trace.
_FOREIGN_TRACE = re.compile(r"Trace with ID '(?:tr-)?([0-9a-f]{32})' already exists in another")
IN_OTHER_EXPERIMENT = "trace_in_other_experiment"


def refused_traces(message: str) -> ExportResult | None:
    """`drop_traces` for MLflow's "Trace with ID ... already exists in another experiment"."""
    found = _FOREIGN_TRACE.search(message)
    if found is None:
        return None
    _log.warn_limited(
        IN_OTHER_EXPERIMENT,
        "mlflow-trace-middleware: MLflow refused spans of a trace that it stores in another "
        "experiment (their spans are dropped, the rest delivered). Every service of a trace "
        "should export to the root service's experiment: check that callers run this package "
        "(our tracestate entry carries the experiment) and that MLFLOW_EXPERIMENT_ID agrees.",
    )
    return ExportResult.drop_traces(IN_OTHER_EXPERIMENT, frozenset({int(found.group(1), 16)}))


# MLflow's answer when an experiment id names no experiment, from the server (404, 422 on 3.9)
# and the store alike: "No Experiment with id=7 exists"; an id that is not a number: "Invalid
# experiment ID 'x'" (400, 422 on 3.9).
_UNKNOWN_EXPERIMENT = re.compile(
    r"No Experiment with id=(\S+) exists|Invalid experiment ID '([^']*)'"
)
UNKNOWN_EXPERIMENT = "unknown_experiment"


class UnknownExperiments:
    """Experiments that callers named (any caller can, in our tracestate entry) and the tracking
    store does not have: their spans are kept, in the process's own experiment, from then on.
    Used by both exporters, so a database and a server behave alike."""

    _MAX = 256

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def route(self, experiment_id: str | None) -> str | None:
        """`experiment_id`, or None (the process's own) once it is known not to exist."""
        return None if experiment_id in self._ids else experiment_id

    def reroute(self, experiment_id: str, own: str | None, where: str) -> ExportResult | None:
        """The store has no `experiment_id`: None to post the batch again to `own` (it was a
        caller's), else the result (`own` itself is missing, or is still being resolved)."""
        if experiment_id == own:
            _log.warn_limited(
                UNKNOWN_EXPERIMENT,
                "mlflow-trace-middleware: %s has no experiment %s; spans are dropped. Set "
                "MLFLOW_EXPERIMENT_ID to an existing experiment, or MLFLOW_EXPERIMENT_NAME "
                "(created if missing).",
                where,
                experiment_id,
            )
            return ExportResult.dropped(UNKNOWN_EXPERIMENT)
        if len(self._ids) >= self._MAX:
            self._ids.clear()
        self._ids.add(experiment_id)
        _log.warn_limited(
            "caller_unknown_experiment",
            "mlflow-trace-middleware: a caller's trace context names experiment %s, which %s "
            "does not have; its spans go to this service's experiment %s instead",
            experiment_id,
            where,
            own or "(being resolved)",
        )
        return None if own is not None else ExportResult.retry_later("experiment_unresolved")


def names_unknown_experiment(message: str, experiment_id: str) -> bool:
    """Whether MLflow's refusal `message` says that `experiment_id` names no experiment."""
    found = _UNKNOWN_EXPERIMENT.search(message[:4096])
    return found is not None and experiment_id in found.groups()
