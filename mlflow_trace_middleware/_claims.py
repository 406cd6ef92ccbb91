"""Claims: which outgoing calls claim their trace, and the placeholder they post.

The MLflow server files a trace under the experiment of the first write it receives for it; a
callee that reports to MLflow on its own (the AI Gateway) would write first. So the first call
of a trace rooted in this process that can reach such a callee posts a placeholder of its span
at once (docs/architecture.md, "Claims"). The outbound core tells this module about each call
(`call_started`, `message_started`) and each answer (`answered`); the processor knows which
traces were rooted here and are still unclaimed; the sink posts the placeholder ahead of every
span (`_sink.ClaimLane`).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanContext, Status, StatusCode

from . import _config, _log, _mlflow
from ._encoding import Recorded, encode_span
from ._spans import LeanSpan

Host = tuple[str, int | None]  # (lower-case host, port) as the client connects

GATEWAY_PATH = "/gateway/"  # MLflow's AI Gateway routes (`/gateway/<endpoint>/...`)
# Hosts whose last answer said they continued our context with this package (insertion order:
# the oldest is forgotten first). A claim is never needed for them.
_ours: dict[Host, None] = {}
MAX_KNOWN_HOSTS = 1024
_NOTHING: Recorded = ({}, (), (), Status(StatusCode.UNSET))  # a placeholder's state


def wanted(path: str, host: Host) -> bool:
    """Whether a call to `host` (`path`) may claim its trace (`MLFLOW_TRACE_CLAIMS`): "auto"
    claims calls that can reach a callee writing into the trace on its own: any host not known
    to run this package (the MLflow server's AI Gateway; a service in another language,
    exporting with its own experiment), and AI Gateway paths behind any host. Hosts are known
    from their answers (`answered`). A claim costs the tracking server one POST, once per trace."""
    claims = _config.get_settings().claims
    if claims != "auto":
        return claims == "always"
    # The tracking server (its AI Gateway) never answers as ours: it is always claimed.
    return path.startswith(GATEWAY_PATH) or host not in _ours


def call_started(ids: SpanContext, span: trace.Span | None, path: str, host: Host) -> None:
    """An HTTP call to `host` left under `ids`: claim the trace if it was rooted here, no call
    claimed it yet and this one may (`wanted`). `span`: the call's span if ours, None for a
    span the caller made itself (an autolog's, whose `traceparent` it set)."""
    if not _mlflow.unclaimed(ids.trace_id):  # most calls
        return
    if (span is None or isinstance(span, LeanSpan)) and wanted(path, host):
        _claim(ids, span)


def message_started(span: trace.Span) -> None:
    """A message of a protocol carrying its own context (MCP, Celery) left in `span`: its
    destination is no MLflow server, so only "always" claims."""
    if (
        isinstance(span, LeanSpan)
        and _mlflow.unclaimed(span.context.trace_id)
        and _config.get_settings().claims == "always"
    ):
        _claim(span.context, span)


def answered(host: Host, ours: bool) -> None:
    """`host` answered, naming itself as running this package (`_propagation.CALLEE`) or not:
    remember it (no call to it needs a claim) or forget it (redeployed as something else)."""
    if not ours:
        _ours.pop(host, None)
    elif host not in _ours:
        if len(_ours) >= MAX_KNOWN_HOSTS:
            _ours.pop(next(iter(_ours)), None)
        _ours[host] = None


def _claim(call: SpanContext, span: LeanSpan | None) -> None:
    """Post a placeholder of the call's span, once per trace: its ids and parent, zero length, no
    attributes but the service, to the root's experiment; the span replaces it when it ends
    (MLflow's stores upsert spans by trace and span id). `span` None: the caller's own MLflow
    span, looked up open in MLflow's trace manager."""
    processor = _mlflow.processor()
    if processor is None:
        return
    taken, experiment = processor.take_unclaimed(call.trace_id)
    if not taken:  # another call of the trace was first
        return
    try:
        placeholder = span.readable() if span is not None else _mlflow.open_span(call)
        if placeholder is None:
            return
        encoded = encode_span(placeholder, _NOTHING, processor.service_attributes())
    except Exception:
        _log.internal_error("trace claim")
        return
    encoded.claim = True
    processor.sink.submit(encoded, experiment)
