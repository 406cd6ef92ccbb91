"""Test helpers: an exporter that keeps spans in memory instead of posting them."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import _runtime
from ._export import ExportResult

if TYPE_CHECKING:
    from ._encoding import EncodedSpan

__all__ = ["InMemoryExporter"]


class InMemoryExporter:
    """Collects exported spans; `batches` records (experiment id, span count) per export call.
    Claims (the placeholder a trace's first outgoing call posts, `EncodedSpan.claim`) are kept
    apart, in `claims`, as (experiment id, span).

    ```python
    exporter = InMemoryExporter()
    configure(exporter=exporter)
    ...
    spans = exporter.finished_spans()   # flushes the sink first
    ```
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[EncodedSpan] = []
        self.batches: list[tuple[str | None, int]] = []
        self.claims: list[tuple[str | None, EncodedSpan]] = []

    def export(self, spans: Sequence[EncodedSpan], experiment_id: str | None) -> ExportResult:
        with self._lock:
            if spans and spans[0].claim:  # the sink never mixes claims and spans in one call
                self.claims += [(experiment_id, span) for span in spans]
            else:
                self.spans.extend(spans)
                self.batches.append((experiment_id, len(spans)))
        return ExportResult.ok()

    def shutdown(self) -> None:
        pass

    def finished_spans(self, timeout: float = 5.0) -> list[EncodedSpan]:
        """Every span exported so far, after flushing the process's sink."""
        if not _runtime.flush(timeout):
            raise AssertionError("the sink did not flush in time")
        with self._lock:
            return list(self.spans)

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()
            self.batches.clear()
            self.claims.clear()
