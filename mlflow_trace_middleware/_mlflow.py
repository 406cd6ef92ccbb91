"""The only module that touches MLflow internals. Why each one is needed: docs/architecture.md.

MLflow creates spans through its own OpenTelemetry tracer provider, and `mlflow.start_span`
only works if a span processor has registered the span's trace in `InMemoryTraceManager`.
MLflow offers no public hook to replace its exporter, so `install()` makes MLflow build its
provider with `SinkSpanProcessor` instead of its own processors. That processor:

- registers every trace segment this process starts, including ones whose parent is remote
  (MLflow's own processor drops those spans), so handler spans nest under the request span;
- hands every finished span to the process's sink, once, at `on_end`, and forgets the
  segment when its last local root ends (no trace state outlives its spans).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from mlflow.entities.span import LiveSpan, create_mlflow_span
from mlflow.entities.trace_info import TraceInfo
from mlflow.entities.trace_location import TraceLocation
from mlflow.entities.trace_state import TraceState
from mlflow.tracing import provider as _provider
from mlflow.tracing.trace_manager import InMemoryTraceManager
from mlflow.tracing.utils import encode_span_id, generate_mlflow_trace_id_from_otel_trace_id
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import _Span as _SdkSpan
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode

from . import _config, _identity, _log, _spans
from ._encoding import EncodedSpan, Recorded, Snapshot, encode_span, recorded, snapshot
from ._keys import REQUEST_ID, SERVICE_NAME, SPAN_TYPE, TRACE_NAME, TRACE_TAG_PREFIX
from ._spans import LeanSpan

if TYPE_CHECKING:
    from ._sink import SpanSink

MAX_OPEN_TRACES = 10_000


class SinkSpanProcessor(SpanProcessor):
    """Registers trace segments for MLflow's fluent API and sends finished spans to the sink.

    Also the `_spans.Owner` of our own spans: it registers one with MLflow when MLflow asks for
    it (`materialize`) and encodes and submits it when it ends (`finish`).
    """

    def __init__(self, sink: SpanSink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        # OTel trace id -> span ids of the open local roots of that trace in this process.
        self._roots: dict[int, set[int]] = {}
        # OTel trace id -> experiment chosen by a trusted caller, while the segment is open.
        self._experiments: dict[int, str] = {}
        # The settings the service name was read from, and the extra attributes of a span
        # without tags.
        self._service: tuple[object, dict[str, str]] = (None, {})
        # OTel trace ids rooted here (no parent anywhere) whose first call has not left yet.
        self._unclaimed: set[int] = set()
        self._materialize_lock = threading.Lock()

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        try:
            self._register(span, parent_context)
        except Exception:
            _log.internal_error("span start")

    def open(self, span: LeanSpan, experiment: str | None) -> None:
        """A request span opens a trace segment here; MLflow hears of it only if asked."""
        trace_id, span_id, _, _, _, _ = span.context
        roots = self._roots
        with self._lock:
            roots.setdefault(trace_id, set()).add(span_id)  # `_add_root`, without its call
            if len(roots) > MAX_OPEN_TRACES:
                self._forget_oldest()
            if experiment is not None:
                self._experiments[trace_id] = experiment
            if span.parent is None:
                self._unclaimed.add(trace_id)

    def _add_root(self, otel_trace_id: int, span_id: int) -> None:
        self._roots.setdefault(otel_trace_id, set()).add(span_id)
        if len(self._roots) > MAX_OPEN_TRACES:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        # A span that never ends (a response never closed) must not pin memory: forget the
        # oldest segment; MLflow's own buffer expires it by TTL.
        oldest = next(iter(self._roots))
        del self._roots[oldest]
        self._experiments.pop(oldest, None)
        self._unclaimed.discard(oldest)

    def _register(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        manager = InMemoryTraceManager.get_instance()
        otel_trace_id = span.context.trace_id
        parent = span.parent
        with self._lock:
            trace_id = manager.get_mlflow_trace_id_from_otel_id(otel_trace_id)
            # Not registered yet, or evicted from MLflow's buffer (MLFLOW_TRACE_BUFFER_MAX_SIZE,
            # 1,000 open traces by default) while it still runs here: register it (again).
            if trace_id is None or trace_id not in manager._traces:
                trace_id = generate_mlflow_trace_id_from_otel_trace_id(otel_trace_id)
                info = TraceInfo(
                    trace_id=trace_id,
                    trace_location=TraceLocation.from_experiment_id(None),  # type: ignore[arg-type]
                    request_time=(span.start_time or 0) // 1_000_000,
                    state=TraceState.IN_PROGRESS,
                )
                manager.register_trace(otel_trace_id, info, is_remote_trace=parent is not None)
                if otel_trace_id not in self._roots:
                    self._add_root(otel_trace_id, span.context.span_id)
                    if parent is None:
                        self._unclaimed.add(otel_trace_id)
            elif parent is None or parent.is_remote:
                self._add_root(otel_trace_id, span.context.span_id)
        if parent is None:
            span.set_attribute(TRACE_NAME, span.name)
            # A trace started here: filed under the session and user of the baggage it sends
            # (a request span, materialized, has its own already).
            for key, value in _identity.recorded(parent_context).items():
                if key not in (span.attributes or {}):
                    span.set_attribute(key, value)
        else:
            _stand_in(manager, trace_id, parent)
        # MLflow's span object writes its own type over the span's (None, unless MLflow made
        # the span and registers it again with the type): ours keep theirs.
        kept = span.attributes.get(SPAN_TYPE) if span.attributes else None
        manager.register_span(create_mlflow_span(span, trace_id))
        if kept is not None:
            span.set_attribute(SPAN_TYPE, kept)

    def on_end(self, span: ReadableSpan) -> None:
        self._finish(span, span.context, registered=True)

    def finish(self, span: LeanSpan) -> None:
        """A span of ours ended; MLflow knows it only if it was materialized."""
        shadow = span._shadow
        if shadow is None:
            self._finish(span, span.context, registered=False)
        else:
            self._finish(shadow, span.context, registered=True)

    def _finish(
        self, span: ReadableSpan | LeanSpan, context: SpanContext | None, registered: bool
    ) -> None:
        if context is None:
            return
        experiment = None
        tags = None
        try:
            trace_id, span_id, _, _, _, _ = context
            experiment = self._experiments.get(trace_id) if self._experiments else None
            tags = self._release(trace_id, span_id, registered)
        except Exception:
            _log.internal_error("span end")
        # Whatever failed above, the span itself still goes out: as a snapshot the sink's
        # worker encodes, off the request path (one with events or links is encoded now).
        try:
            extra = self._extra(tags)
            taken: Snapshot | EncodedSpan | None = None
            lean = None
            # The class first: the common case without an `isinstance` call.
            if span.__class__ is LeanSpan or not isinstance(span, ReadableSpan):
                lean = span.snapshot(extra)  # ours: its snapshot and size estimate in one pass
                if lean is None:
                    readable = span.readable()
                    taken = encode_span(readable, recorded(readable), extra)
            else:
                state = _without_request_id(recorded(span))
                taken = snapshot(span, state, extra) or encode_span(span, state, extra)
        except Exception:
            _log.internal_error("span encode")
            self._sink.count_dropped("encoding_error")
            return
        if lean is not None:
            self._sink.hand_over(*lean, experiment)
        elif taken is not None:
            self._sink.submit_later(taken, experiment)

    def _extra(self, tags: dict[str, str] | None) -> dict[str, str]:
        """Attributes every span gets: the service name and, on a segment's root, trace tags."""
        settings = _config.get_settings()  # one value per configure(): the name kept with it
        cached = self._service
        if cached[0] is not settings:
            cached = self._service = (settings, {SERVICE_NAME: settings.service_name})
        if tags:
            return {**cached[1], **(_tag_attributes(tags) or {})}
        return cached[1]

    @property
    def sink(self) -> SpanSink:
        return self._sink

    def service_attributes(self) -> dict[str, str]:
        """The attributes every span gets (the service name)."""
        return self._extra(None)

    def take_unclaimed(self, otel_trace_id: int) -> tuple[bool, str | None]:
        """Mark the trace claimed: whether it still was unclaimed, and its experiment."""
        with self._lock:
            if otel_trace_id not in self._unclaimed:
                return False, None
            self._unclaimed.discard(otel_trace_id)
            return True, self._experiments.get(otel_trace_id)

    def experiment_of(self, otel_trace_id: int) -> str | None:
        return self._experiments.get(otel_trace_id)

    def _release(self, otel_trace_id: int, span_id: int, registered: bool) -> dict[str, str] | None:
        """Forget the segment when its last local root ends; return the trace's user tags."""
        with self._lock:
            roots = self._roots.get(otel_trace_id)
            if roots is None or span_id not in roots:
                if registered:
                    self._forget_span(otel_trace_id, span_id)
                return None
            roots.discard(span_id)
            if roots:
                return None
            del self._roots[otel_trace_id]
            self._experiments.pop(otel_trace_id, None)
            self._unclaimed.discard(otel_trace_id)
            manager = InMemoryTraceManager._instance  # None: none made yet
            if manager is None or otel_trace_id not in manager._otel_id_to_mlflow_trace_id:
                return None  # MLflow never heard of this trace (a request with no MLflow spans)
            # Not `pop_trace`: it converts every span to an immutable copy we do not need.
            with manager._lock:
                trace_id = manager._otel_id_to_mlflow_trace_id.pop(otel_trace_id, None)
                segment = manager._traces.pop(trace_id, None) if trace_id else None
        if segment is None:
            return None
        return {k: v for k, v in segment.info.tags.items() if not k.startswith("mlflow.")}

    @staticmethod
    def _forget_span(otel_trace_id: int, span_id: int) -> None:
        # An ended span is already on its way to the sink; MLflow's manager keeps it (for its
        # own exporter, which we replaced) until the trace ends: a long agent run would pin
        # every span it made. Only open spans need to be found there.
        manager = InMemoryTraceManager.get_instance()
        with manager._lock:
            trace_id = manager._otel_id_to_mlflow_trace_id.get(otel_trace_id)
            segment = manager._traces.get(trace_id) if trace_id else None
            if segment is not None:
                segment.span_dict.pop(encode_span_id(span_id), None)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._sink.flush(timeout_millis / 1000)

    @property
    def span_exporter(self) -> _ExporterFacade:
        """What `mlflow.flush_trace_async_logging()` reaches for (`_get_trace_exporter()`
        returns the first processor's `span_exporter`, whose `_async_queue` it flushes); MLflow
        documents that call for scripts before they exit. Without it MLflow 3.9 logs an
        AttributeError at ERROR; with it the call flushes our sink."""
        return _ExporterFacade(self._sink)

    def materialize(self, span: LeanSpan) -> SdkSpan | None:
        """Register one of our spans with MLflow, as an SDK span that takes over its state.

        Called when MLflow looks the span up (`mlflow.get_current_active_span()` and the APIs
        built on it); a request whose handler never asks costs MLflow nothing.
        """
        sdk_tracer = tracer()
        if _processor is not self or not isinstance(sdk_tracer, SdkTracer):
            return None
        with self._materialize_lock:  # two handler threads asking at once must get one shadow
            if span.shadow is not None or not span.is_recording():
                return span.shadow
            try:
                return self._materialize(span, sdk_tracer)
            except Exception:
                _log.internal_error("span materialize")
                return None

    def _materialize(self, span: LeanSpan, sdk_tracer: SdkTracer) -> SdkSpan:
        attributes, events, links, status = span.recorded()
        # `_Span` is the SDK span a Tracer makes (the public class refuses direct use); a tracer
        # cannot be asked for a span with ids chosen already.
        shadow = _SdkSpan(
            span.name,
            span.context,
            parent=span.parent,
            sampler=sdk_tracer.sampler,
            resource=sdk_tracer.resource,
            attributes=attributes,
            events=events,
            links=links,
            kind=span.kind,
            limits=sdk_tracer._span_limits,
            instrumentation_scope=_spans.SCOPE,
        )
        shadow.start(start_time=span.start_time)
        if status.status_code is not StatusCode.UNSET:
            shadow.set_status(status)
        self.on_start(shadow)
        span.adopt(shadow)
        return shadow


class _SinkQueue:
    """Answers MLflow's `AsyncTraceExportQueue.flush(terminate=...)` by flushing the sink for
    up to `shutdown_timeout`; the sink keeps running (`atexit` ends it)."""

    def __init__(self, sink: SpanSink) -> None:
        self._sink = sink

    def flush(self, terminate: bool = False) -> None:
        try:
            self._sink.flush(_config.get_settings().shutdown_timeout)
        except Exception:
            _log.internal_error("flush_trace_async_logging")


class _ExporterFacade:
    """Stands where MLflow looks for its own exporter (`SinkSpanProcessor.span_exporter`)."""

    def __init__(self, sink: SpanSink) -> None:
        self._async_queue = _SinkQueue(sink)


def _without_request_id(state: Recorded) -> Recorded:
    """An SDK span's state without MLflow's `mlflow.traceRequestId`, which is not sent.

    The server derives the trace id from the OTLP trace id. MLflow 3.9 to 3.12 took the
    attribute instead when a span had one, and MLflow's SDK spans hold it JSON-encoded
    (`"tr-..."`, quotes included): those spans were filed under a second trace.
    """
    attributes, events, links, status = state
    if REQUEST_ID not in attributes:
        return state
    kept = {key: value for key, value in attributes.items() if key != REQUEST_ID}
    return kept, events, links, status


def _stand_in(manager: InMemoryTraceManager, trace_id: str, parent: SpanContext) -> None:
    """Register a span with no parent under the id of a parent MLflow does not know.

    MLflow's LangChain tracer (3.9 to 3.17, `MlflowLangchainTracer._resolve_parent_span`)
    walks up the active span's ancestors with `get_span_from_id` until one has no parent. A
    remote parent is not there, nor one of our spans MLflow never asked for (a request span
    is registered only when looked up): the walk failed on None and every LangChain span
    became a child of the request span. The stand-in ends the walk where MLflow's knowledge
    ends; materializing our span replaces it. It is never exported (only spans that end reach
    the sink) and goes with the segment.
    """
    span_id = encode_span_id(parent.span_id)
    with manager._lock:
        segment = manager._traces.get(trace_id)
        if segment is not None and span_id not in segment.span_dict:
            segment.span_dict[span_id] = LiveSpan(_SdkSpan("remote parent", parent), trace_id)


def _tag_attributes(tags: dict[str, str] | None) -> dict[str, str] | None:
    # `mlflow.update_current_trace(tags=...)` lives in the trace manager; the server restores
    # `mlflow.traceTag.*` root-span attributes as trace tags, as MLflow's own OTLP processor does.
    if not tags:
        return None
    return {TRACE_TAG_PREFIX + key: value for key, value in tags.items()}


_install_lock = threading.Lock()
_processor: SinkSpanProcessor | None = None
_original_get_span_processors = _provider._get_span_processors


def install(processor: SinkSpanProcessor) -> None:
    """Make MLflow build its tracer provider with `processor` only. Idempotent."""
    global _processor
    with _install_lock:
        if _processor is processor:
            return
        _processor = processor

        def span_processors(disabled: bool = False) -> list[SpanProcessor]:
            return [] if disabled or _processor is None else [_processor]

        _provider._get_span_processors = span_processors
        # The next tracing call builds a fresh provider through the function above.
        _provider.provider.reset()


def on_first_provider(start: Callable[[], object]) -> None:
    """Call `start` (which `install`s a processor) when MLflow builds its tracer provider,
    unless one is installed by then: a process's first MLflow span then goes to our processor
    too. MLflow's own processors are built if `start` fails."""

    def span_processors(disabled: bool = False) -> list[SpanProcessor]:
        if _provider._get_span_processors is span_processors:
            _provider._get_span_processors = _original_get_span_processors
            try:
                start()
            except Exception:
                _log.internal_error("runtime start")
        return _provider._get_span_processors(disabled=disabled)

    with _install_lock:
        if _processor is None:
            _provider._get_span_processors = span_processors


# -- context helpers used by the integrations ---------------------------------------------------


class _Binding(NamedTuple):
    """MLflow's tracer and context API for the provider in place when they were looked up."""

    isolated_provider: object
    global_provider: object
    tracer: trace.Tracer
    context_api: Any


_binding: _Binding | None = None
_NONE = object()


def _bound() -> _Binding:
    """The cached binding, looked up again when MLflow replaces or resets its provider.

    MLflow reads `MLFLOW_USE_DEFAULT_TRACER_PROVIDER` from the environment on every call that
    picks its provider or context; once per request, that was a tenth of our cost. Either
    provider slot changing (MLflow resets them on every reconfiguration) refreshes the binding.
    """
    global _binding
    wrapper = _provider.provider
    isolated = getattr(wrapper, "_isolated_tracer_provider", _NONE)
    global_provider = getattr(trace, "_TRACER_PROVIDER", _NONE)
    cached = _binding
    if (
        cached is not None
        and cached.isolated_provider is isolated
        and cached.global_provider is global_provider
        and isolated is not _NONE
        and (isolated is not None or global_provider is not None)
    ):
        return cached
    fresh = _provider._get_tracer("mlflow_trace_middleware")  # initializes the provider
    binding = _Binding(
        getattr(wrapper, "_isolated_tracer_provider", _NONE),
        getattr(trace, "_TRACER_PROVIDER", _NONE),
        fresh,
        _provider.get_context_api(),
    )
    _binding = binding
    return binding


def tracer() -> trace.Tracer:
    """MLflow's tracer; cached per provider (getting one builds a new Tracer object each time)."""
    return _bound().tracer


class Parent(NamedTuple):
    """Where a span of ours starts, as the service decided from its caller's context."""

    context: Context  # the caller's baggage (if taken), to add our span to
    links: list[Link]
    experiment: str | None  # chosen by a trusted caller
    trusted: bool  # the caller's context (and baggage) is taken
    trace_id: int | None = None  # adopted from the caller, for a root span
    remote: bool = True  # the carrier held a valid context (trusted or not)
    # The caller's span, continued (IN_CONTEXT: whatever span is current, for a message).
    span_context: SpanContext | _spans.InContext | None = None


# Under whatever span is current in the context given.
CURRENT = Parent(Context(), [], None, trusted=True, remote=False, span_context=_spans.IN_CONTEXT)


def start_current(
    name: str,
    context: Context | None,
    kind: SpanKind,
    attributes: dict[str, Any],
    parent: Parent,
    settings: _config.Settings | None = None,
    *,
    attach: bool = False,
) -> tuple[trace.Span, Context, Token | None]:
    """One of our spans, from MLflow's tracer, reporting to the installed processor, under
    `parent` (its links, the experiment and trace id it chose, the caller's span), and the
    context that makes it current, attached when `attach` (a request's SERVER span: the token
    `detach` takes, else None). A span with no parent in this process opens a trace segment
    (routed to the parent's experiment). MLflow's binding is looked up once for all of it;
    `settings`: those the request read (the attribute length limit, `_spans.start`)."""
    binding = _bound()
    tracer, processor = binding.tracer, _processor
    caller = parent.span_context
    span: trace.Span
    if processor is None:  # not installed (tests): MLflow's own machinery
        under = context
        if caller is not _spans.IN_CONTEXT and caller is not None:
            under = trace.set_span_in_context(trace.NonRecordingSpan(caller), context)
        span = tracer.start_span(name, under, kind, attributes, parent.links)
    else:
        links, trace_id = parent.links, parent.trace_id
        span = _spans.start(
            tracer, processor, name, context, kind, attributes, links, trace_id, caller, settings
        )
        if type(span) is LeanSpan and (
            kind is SpanKind.SERVER
            # A consumed message opens a segment unless it runs under a span of this process
            # (an eager Celery task).
            or (kind is SpanKind.CONSUMER and (span.parent is None or span.parent.is_remote))
        ):
            processor.open(span, parent.experiment)
    current = trace.set_span_in_context(span, context)
    if not attach:
        return span, current, None
    api = binding.context_api
    return span, current, (api, api.attach(current))


def start_child(
    name: str, context: Context | None, parent: SpanContext, attributes: dict[str, Any]
) -> trace.Span:
    """`start_current`'s span for a CLIENT span under `parent` (valid, the span of `context`):
    the cheap path of `_spans.start_child` when MLflow's sampler follows the parent."""
    processor = _processor
    if processor is not None:
        span = _spans.start_child(tracer(), processor, name, parent, SpanKind.CLIENT, attributes)
        if span is not None:
            return span
    return start_current(name, context, SpanKind.CLIENT, attributes, CURRENT)[0]


def is_open(span_context: SpanContext) -> bool:
    """Whether an MLflow span (an SDK span registered in MLflow's trace manager) with these ids
    is open in this process. Ended spans are dropped from the manager (`_forget_span`)."""
    return open_span(span_context) is not None


def open_span(span_context: SpanContext) -> SdkSpan | None:
    """The open MLflow span with these ids, if MLflow's trace manager holds it."""
    manager = InMemoryTraceManager.get_instance()
    with manager._lock:
        trace_id = manager._otel_id_to_mlflow_trace_id.get(span_context.trace_id)
        segment = manager._traces.get(trace_id) if trace_id else None
        live = segment.span_dict.get(encode_span_id(span_context.span_id)) if segment else None
    return live._span if live is not None else None


def processor() -> SinkSpanProcessor | None:
    """The installed processor, if any."""
    return _processor


def unclaimed(otel_trace_id: int) -> bool:
    """Whether the trace was rooted here and no outgoing call has claimed it yet (`_claims`):
    request spans and SDK spans with no parent at all, forgotten with their segment. One set
    look-up, no lock: it is asked on every call."""
    processor = _processor
    return processor is not None and otel_trace_id in processor._unclaimed


def current_context() -> Context | None:
    """MLflow's current context (its own runtime context unless unified with OTel's)."""
    api = _bound().context_api
    return api.get_current() if api is _provider.mlflow_runtime_context else None


def routed_experiment(otel_trace_id: int) -> str | None:
    """The experiment a trusted caller chose for this trace, if one did."""
    processor = _processor
    return processor.experiment_of(otel_trace_id) if processor is not None else None


# What `attach` returns and `detach` takes: the context API that attached, and its token
# (`detach` need not look MLflow's binding up again).
Token = tuple[Any, object]


def attach(context: Context) -> Token:
    api = _bound().context_api
    return api, api.attach(context)


def detach(token: Token) -> None:
    api, attached = token
    api.detach(attached)


def attach_quietly(context: Context) -> Token | None:
    """`attach` for adapters that run the work either way: None (logged) if it failed."""
    try:
        return attach(context)
    except Exception:
        _log.internal_error("context attach")
        return None


def detach_quietly(token: Token | None) -> None:
    """`detach` what `attach_quietly` returned (None: nothing was attached)."""
    if token is not None:
        try:
            detach(token)
        except Exception:
            _log.internal_error("context detach")
