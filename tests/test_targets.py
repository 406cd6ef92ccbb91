"""Outbound propagation targets: the allowlist of where our trace context may be sent."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import httpx2
import mlflow
import pytest
import requests
from opentelemetry.trace import SpanKind

import mlflow_trace_middleware as mtm
from mlflow_trace_middleware import _client, _config, _targets
from mlflow_trace_middleware import httpx as mtm_httpx
from mlflow_trace_middleware import httpx2 as mtm_httpx2
from mlflow_trace_middleware import requests as mtm_requests
from mlflow_trace_middleware._keys import PROPAGATION
from mlflow_trace_middleware.httpx import AsyncTracingTransport, TracingTransport
from mlflow_trace_middleware.requests import TracingAdapter
from mlflow_trace_middleware.testing import InMemoryExporter
from tests.helpers import traceparent_for

OURS = ("traceparent", "tracestate", "baggage")


@pytest.fixture(autouse=True)
def _no_process_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_targets.ENV, raising=False)
    _config.reload()


def allowed(host: str) -> bool:
    """Whether the process's allowlist lets context go to `http://{host}/`."""
    return _client.allowed(("http", host, None, "/"))


# -- the matcher ----------------------------------------------------------------------------------


def httpx_destination(url: str) -> _targets.Destination | None:
    return mtm_httpx._destination(httpx.URL(url))


def requests_destination(url: str) -> _targets.Destination | None:
    return mtm_requests._destination(requests.Request("GET", url).prepare().url or "")


@pytest.fixture(params=[httpx_destination, requests_destination], ids=["httpx", "requests"])
def destination(request: pytest.FixtureRequest) -> Any:
    """How each client parses a URL into where it connects."""
    return request.param


API = ["api.internal"]
PREFIX = ["https://api.internal:8443/v1/"]


@pytest.mark.parametrize(
    ("patterns", "url", "allowed"),
    [
        pytest.param(API, "http://api.internal/x", True, id="exact"),
        pytest.param(API, "https://api.internal:8443/x", True, id="any-port"),
        pytest.param(["API.Internal"], "http://api.INTERNAL/", True, id="case"),
        pytest.param(["api.internal."], "http://api.internal/", True, id="pattern-trailing-dot"),
        pytest.param(API, "http://api.internal./", True, id="url-trailing-dot"),
        pytest.param(API, "http://api.internal../", False, id="two-trailing-dots"),
        pytest.param(API, "http://internal/", False, id="parent-domain"),
        pytest.param(["api.internal:8443"], "https://api.internal:8443/", True, id="port"),
        pytest.param(["api.internal:8443"], "https://api.internal/", False, id="other-port"),
        pytest.param(["api.internal:443"], "https://api.internal/", True, id="default-port"),
        pytest.param(["api.internal:443"], "http://api.internal/", False, id="default-port-80"),
        pytest.param(["*.internal"], "http://api.internal/", True, id="wildcard"),
        pytest.param(["*.internal"], "http://a.b.internal/", True, id="wildcard-deep"),
        pytest.param(["*.internal"], "http://internal/", False, id="wildcard-not-bare"),
        pytest.param(["*.internal", "internal"], "http://internal/", True, id="wildcard-and-bare"),
        pytest.param(["*.internal"], "http://evilinternal/", False, id="wildcard-label-boundary"),
        pytest.param(["*.internal:8443"], "https://a.internal:8443/", True, id="wildcard-port"),
        pytest.param(["*.internal:8443"], "https://a.internal/", False, id="wildcard-other-port"),
        # Look-alikes: each connects somewhere else.
        pytest.param(API, "http://api.internal.evil.test/", False, id="suffix-look-alike"),
        pytest.param(API, "http://evilapi.internal/", False, id="prefix-look-alike"),
        pytest.param(["*.internal"], "http://api.internal.evil.test/", False, id="wildcard-suffix"),
        pytest.param(API, "http://api.internal@evil.test/", False, id="userinfo"),
        pytest.param(API, "http://user@api.internal@evil.test/", False, id="double-userinfo"),
        pytest.param(API, "http://api.internal:443@evil.test/", False, id="userinfo-port"),
        pytest.param(API, "http://evil.test#@api.internal/", False, id="fragment-at"),
        pytest.param(API, "http://evil.test?@api.internal/", False, id="query-at"),
        pytest.param(API, "http://api.internal%2eevil.test/", False, id="percent-encoded-dot"),
        pytest.param(API, "http://\u0430pi.internal/", False, id="cyrillic-a"),
        pytest.param(API, "http://xn--pi-6kc.internal/", False, id="cyrillic-a-punycode"),
        pytest.param(["b\u00fccher.example"], "http://b\u00fccher.example/", True, id="idna"),
        pytest.param(["b\u00fccher.example"], "http://xn--bcher-kva.example/", True, id="idna-ace"),
        pytest.param(["bucher.example"], "http://b\u00fccher.example/", False, id="idna-ascii"),
        # IP literals: exact, never a name that may resolve to them.
        pytest.param(["127.0.0.1"], "http://127.0.0.1:8080/", True, id="ipv4"),
        pytest.param(["127.0.0.1"], "http://127.0.0.2/", False, id="ipv4-other"),
        pytest.param(["127.0.0.1"], "http://localhost/", False, id="ipv4-not-by-name"),
        pytest.param(["127.0.0.1"], "http://127.1/", False, id="ipv4-short-form"),
        pytest.param(["127.0.0.1"], "http://2130706433/", False, id="ipv4-integer-form"),
        pytest.param(["*.internal"], "http://127.0.0.1/", False, id="wildcard-not-ip"),
        pytest.param(["[::1]"], "http://[::1]:8080/", True, id="ipv6"),
        pytest.param(["[::1]"], "http://[0:0::1]/", True, id="ipv6-canonical"),
        pytest.param(["[::1]:8080"], "http://[::1]:8081/", False, id="ipv6-other-port"),
        pytest.param(["[::1]"], "http://[::2]/", False, id="ipv6-other"),
        # URL prefixes: scheme, host and effective port exactly, the path at a segment boundary.
        pytest.param(PREFIX, "https://api.internal:8443/v1/items", True, id="prefix"),
        pytest.param(PREFIX, "https://api.internal:8443/v1", True, id="prefix-exact"),
        pytest.param(PREFIX, "https://api.internal:8443/v1/x?next=/v2", True, id="prefix-query"),
        pytest.param(PREFIX, "https://api.internal:8443/v10", False, id="prefix-segment"),
        pytest.param(["https://api.internal/v1"], "https://api.internal/v10/", False, id="v1-v10"),
        pytest.param(PREFIX, "https://api.internal:8443/v2/x", False, id="prefix-other-path"),
        pytest.param(PREFIX, "https://api.internal:8443/V1/x", False, id="prefix-path-case"),
        pytest.param(PREFIX, "http://api.internal:8443/v1/x", False, id="prefix-scheme"),
        pytest.param(PREFIX, "https://api.internal/v1/x", False, id="prefix-port"),
        pytest.param(PREFIX, "https://evil.test:8443/v1/x", False, id="prefix-host"),
        pytest.param(PREFIX, "https://api.internal:8443/v1/../admin", False, id="dot-segment"),
        pytest.param(PREFIX, "https://api.internal:8443/v1/%2e%2e/admin", False, id="encoded-dots"),
        pytest.param(
            PREFIX, "https://api.internal:8443/v1%2f..%2fadmin", False, id="encoded-slash"
        ),
        pytest.param(
            ["https://api.internal/v1"], "https://api.internal:443/v1/x", True, id="prefix-443"
        ),
        pytest.param(["https://api.internal"], "https://api.internal/any", True, id="origin"),
        pytest.param(["https://api.internal/"], "https://api.internal/", True, id="origin-slash"),
        pytest.param(["*"], "http://anything.test:1234/", True, id="everywhere"),
        pytest.param([], "http://api.internal/", False, id="nowhere"),
        pytest.param("api.internal, *.svc", "http://a.svc/", True, id="comma-separated"),
    ],
)
def test_matcher(patterns: Any, url: str, allowed: bool, destination: Any) -> None:
    where = destination(url)
    assert (where is not None and _targets.Targets(patterns).allows(*where)) is allowed


def test_a_scheme_without_a_default_port_matches_only_any_port_hosts() -> None:
    targets = _targets.Targets(["api.internal", "gw.internal:443", "https://px.internal"])
    assert targets.allows("ws", "api.internal", None, "/")
    assert not targets.allows("ws", "gw.internal", None, "/")
    assert not targets.allows("ws", "px.internal", None, "/")


def test_each_client_is_matched_where_it_connects() -> None:
    # httpx takes "evil.test\" as user info and connects to api.internal; requests connects to
    # evil.test. Each hop is judged by its own client's parse, never by a string check.
    url = "http://evil.test\\@api.internal/"
    assert httpx_destination(url) == ("http", "api.internal", None, "/")
    assert requests_destination(url) == ("http", "evil.test", None, "/%5C@api.internal/")
    targets = _targets.Targets(API)
    assert targets.allows("http", "api.internal", None, "/")
    assert not targets.allows("http", "evil.test", None, "/%5C@api.internal/")


def test_requests_urls_its_parsers_disagree_on_go_nowhere() -> None:
    # requests >= 2.32 connects where `urlparse` says (b.test), older ones where urllib3 says.
    assert mtm_requests._destination("http://a.test\\@b.test/") is None


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        pytest.param("API.INTERNAL.", True, id="case-and-dot"),
        pytest.param("api.internal..", False, id="empty-label"),
        pytest.param(".api.internal", False, id="leading-dot"),
        pytest.param("b\u00fccher.api.internal", False, id="not-idna-encoded"),
        pytest.param("api.internal%2eevil.test", False, id="percent"),
        pytest.param("a" * 64 + ".internal", False, id="label-too-long"),
        pytest.param("[::1]", True, id="ipv6-brackets"),
        pytest.param("0:0:0:0:0:0:0:1", True, id="ipv6-long-form"),
        pytest.param("fe80::1%eth0", False, id="ipv6-zone"),
        pytest.param("1:2:3", False, id="not-ipv6"),
    ],
)
def test_matcher_host_forms(host: str, allowed: bool) -> None:
    targets = _targets.Targets(["*.internal", "api.internal", "[::1]"])
    assert targets.allows("http", host, None, "/") is allowed


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("api.internal/v1", "URL prefix", id="path-without-scheme"),
        pytest.param("user@api.internal", "'@'", id="userinfo"),
        pytest.param("*.", "valid host", id="bare-wildcard"),
        pytest.param("api.*.internal", "wildcard", id="inner-wildcard"),
        pytest.param("*api.internal", "wildcard", id="glob"),
        pytest.param("*.127.0.0.1", "IP address", id="wildcard-ip"),
        pytest.param("*.[::1]", "IP address", id="wildcard-ipv6"),
        pytest.param("api.internal:0", "port", id="port-0"),
        pytest.param("api.internal:65536", "port", id="port-too-big"),
        pytest.param("api.internal:https", "port", id="port-name"),
        pytest.param("api.internal:", "port", id="port-empty"),
        pytest.param("::1", "brackets", id="ipv6-bare"),
        pytest.param("[::1", "']'", id="ipv6-unclosed"),
        pytest.param("[::1]x", "after", id="ipv6-junk"),
        pytest.param("[api.internal]", "IPv6", id="ipv6-not-an-address"),
        pytest.param("[fe80::1%eth0]", "zone", id="ipv6-zone"),
        pytest.param("127.0.0.01", "IPv4", id="ipv4-leading-zero"),
        pytest.param("256.0.0.1", "IPv4", id="ipv4-out-of-range"),
        pytest.param("127.1", "IPv4", id="ipv4-short"),
        pytest.param("api internal", "valid host", id="space"),
        pytest.param("a" * 64 + ".internal", "valid host", id="label-too-long"),
        pytest.param("\u2603.net", "internationalised", id="idna-invalid"),
        pytest.param("ftp://api.internal/", "http", id="prefix-scheme"),
        pytest.param("https://user:pw@api.internal/", "user info", id="prefix-userinfo"),
        pytest.param("https://api.internal/v1?x=1", "query", id="prefix-query"),
        pytest.param("https://api.internal/v1#x", "fragment", id="prefix-fragment"),
        pytest.param("https://*.internal/", "one host", id="prefix-wildcard"),
        pytest.param("https://api.internal/v1/../x", "dot segments", id="prefix-dot-segment"),
        pytest.param("https://api.internal/%2e", "dot segments", id="prefix-encoded-dot"),
        pytest.param("https://api.internal/caf\u00e9", "ASCII", id="prefix-unicode-path"),
        pytest.param("https://", "valid host", id="prefix-no-host"),
    ],
)
def test_invalid_patterns_raise(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid propagation target") as raised:
        _targets.Targets([pattern])
    assert message in str(raised.value)


def test_patterns_must_be_strings() -> None:
    with pytest.raises(ValueError, match="strings"):
        _targets.Targets([b"api.internal"])  # type: ignore[list-item]


# -- configuration --------------------------------------------------------------------------------


def test_default_is_everywhere() -> None:
    assert _config.get_settings().propagate_to is None
    assert _targets.permits(None, lambda: None)
    assert _client.allowed(None)


def test_environment_variable(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.setenv(_targets.ENV, " api.internal ,, *.svc:8080, not a host")
    with caplog.at_level(logging.WARNING, logger="mlflow_trace_middleware"):
        _config.reload()
    targets = _config.get_settings().propagate_to
    assert targets is not None
    assert targets.allows("http", "api.internal", None, "/")
    assert targets.allows("http", "a.svc", 8080, "/")
    assert not targets.allows("http", "a.svc", 80, "/")
    (record,) = caplog.records
    assert _targets.ENV in record.getMessage()
    assert "'not a host'" in record.getMessage()


def test_environment_variable_with_only_invalid_entries_allows_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_targets.ENV, "api.internal/v1")
    _config.reload()
    targets = _config.get_settings().propagate_to
    assert targets is not None
    assert not targets.allows("http", "api.internal", None, "/v1")


def test_configure_replaces_the_list_and_rejects_invalid_patterns(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_targets.ENV, "api.internal")
    _config.reload()
    assert allowed("api.internal")
    mtm.configure(propagate_to=["other.internal"])
    assert not allowed("api.internal")
    assert allowed("other.internal")
    with pytest.raises(ValueError, match="invalid propagation target 'a/b'"):
        mtm.configure(service_name="changed", propagate_to=["a/b"])
    assert allowed("other.internal")
    assert _config.get_settings().service_name == "test-svc"  # nothing of it was applied
    mtm.configure(service_name="test-svc")  # None keeps the list
    assert not allowed("api.internal")
    _config.reload()  # the variables read again: configure()'s list stays on top
    assert not allowed("api.internal")
    mtm.configure(propagate_to="*")
    assert allowed("api.internal")


def test_transports_reject_invalid_patterns() -> None:
    for make in (TracingTransport, AsyncTracingTransport, TracingAdapter):
        with pytest.raises(ValueError, match="invalid propagation target"):
            make(propagate_to=["*api.internal"])


def test_a_failing_check_sends_nothing(exporter: InMemoryExporter) -> None:
    def broken() -> _targets.Destination:
        raise RuntimeError("boom")

    assert not _targets.permits(_targets.Targets(API), broken)


def test_adapter_keeps_its_allowlist_when_pickled() -> None:
    adapter = pickle.loads(pickle.dumps(TracingAdapter(propagate_to=API)))
    assert adapter._propagate_to.allows("http", "api.internal", None, "/")
    assert not adapter._propagate_to.allows("http", "evil.test", None, "/")


# -- real clients against loopback servers on two addresses ---------------------------------------


class _Server(ThreadingHTTPServer):
    log: list[tuple[str, dict[str, str]]]  # (this server's URL + path, headers) per request


class _Handler(BaseHTTPRequestHandler):
    """Records what each request carried; `/redirect?to=URL` redirects to an absolute URL."""

    server: _Server

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        host, port = self.server.server_address[:2]
        self.server.log.append((f"http://{host}:{port}{self.path}", headers))
        target = parse_qs(urlsplit(self.path).query).get("to")
        if target:
            self.send_response(302)
            self.send_header("Location", target[0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps(headers).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Hosts:
    """`trusted` (localhost, 127.0.0.1) and `other` (127.0.0.2): two hosts, two ports."""

    trusted: str
    other: str
    log: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def received(self) -> list[dict[str, str]]:
        """The headers each hop received, in order."""
        return [headers for _, headers in self.log]


@pytest.fixture(scope="session")
def loopback_hosts() -> Iterator[Hosts]:
    log: list[tuple[str, dict[str, str]]] = []
    servers = []
    for address in ("127.0.0.1", "127.0.0.2"):
        server = _Server((address, 0), _Handler)
        server.log = log
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    a, b = (s.server_address[1] for s in servers)
    yield Hosts(f"http://localhost:{a}", f"http://127.0.0.2:{b}", log)
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hosts(loopback_hosts: Hosts) -> Hosts:
    loopback_hosts.log.clear()
    return loopback_hosts


def get(kind: str, url: str, headers: dict[str, str] | None = None, **transport: Any) -> None:
    """GET `url`, following redirects, through the traced `kind` of client.

    With `transport` (`propagate_to=`), through an explicit TracingTransport/TracingAdapter;
    without, through a plain client (for `instrument()`).
    """
    if kind.startswith("httpx"):
        lib, adapter = (httpx2, mtm_httpx2) if kind.startswith("httpx2") else (httpx, mtm_httpx)
        if not kind.endswith("-async"):
            sync = adapter.TracingTransport(**transport) if transport else None
            with lib.Client(transport=sync, follow_redirects=True) as client:
                client.get(url, headers=headers).raise_for_status()
            return

        async def run() -> None:
            wrapped = adapter.AsyncTracingTransport(**transport) if transport else None
            async with lib.AsyncClient(transport=wrapped, follow_redirects=True) as client:
                (await client.get(url, headers=headers)).raise_for_status()

        asyncio.run(run())  # the task runs in a copy of this context: the active span included
    else:
        with requests.Session() as session:
            if transport:
                session.mount("http://", TracingAdapter(**transport))
            session.get(url, headers=headers, timeout=5).raise_for_status()


CLIENTS = pytest.mark.parametrize(
    "kind", ["httpx", "httpx-async", "httpx2", "httpx2-async", "requests"]
)


def client_spans(exporter: InMemoryExporter) -> list[Any]:
    spans = [s for s in exporter.finished_spans() if s.kind == SpanKind.CLIENT]
    return sorted(spans, key=lambda s: s.start_time)


@CLIENTS
def test_allowed_host_receives_context(exporter: InMemoryExporter, hosts: Hosts, kind: str) -> None:
    with mlflow.start_span("root"):
        get(kind, f"{hosts.trusted}/echo", propagate_to=["localhost"])
    (call,) = client_spans(exporter)
    (received,) = hosts.received()
    assert received["traceparent"] == traceparent_for(call)
    assert PROPAGATION not in call.attributes


@CLIENTS
def test_host_not_allowed_receives_no_context(
    exporter: InMemoryExporter, hosts: Hosts, kind: str
) -> None:
    mine = {"baggage": "tenant=acme", "tracestate": "vendor=x", "x-request-id": "r-1"}
    with mlflow.start_span("root"):
        get(kind, f"{hosts.other}/echo", mine, propagate_to=["localhost"])
    (received,) = hosts.received()
    assert not set(OURS) & set(received)
    assert received["x-request-id"] == "r-1"  # the caller's own headers are untouched
    (call,) = client_spans(exporter)  # the call happened: it is still recorded
    (root,) = [s for s in exporter.finished_spans() if s.name == "root"]
    assert call.parent.span_id == root.context.span_id
    assert call.attributes[PROPAGATION] == "blocked"


@CLIENTS
def test_redirect_to_a_host_not_allowed_receives_no_context(
    exporter: InMemoryExporter, hosts: Hosts, kind: str
) -> None:
    # The clients drop Authorization on a cross-origin redirect but copy every other header of
    # the previous hop, ours included.
    mine = {"baggage": "tenant=acme", "Authorization": "Bearer s3cret"}
    with mlflow.start_span("root"):
        get(
            kind,
            f"{hosts.trusted}/redirect?to={hosts.other}/target",
            mine,
            propagate_to=["localhost"],
        )
    first, second = hosts.received()
    calls = client_spans(exporter)
    assert [c.attributes["http.response.status_code"] for c in calls] == [302, 200]
    assert first["traceparent"] == traceparent_for(calls[0])
    assert first["baggage"] == "tenant=acme"
    assert not {*OURS, "authorization"} & set(second)
    assert calls[1].attributes[PROPAGATION] == "blocked"


@CLIENTS
def test_redirect_from_a_host_not_allowed_sends_fresh_context(
    exporter: InMemoryExporter, hosts: Hosts, kind: str
) -> None:
    with mlflow.start_span("root"):
        get(kind, f"{hosts.other}/redirect?to={hosts.trusted}/target", propagate_to=["localhost"])
    first, second = hosts.received()
    calls = client_spans(exporter)
    assert not set(OURS) & set(first)
    assert second["traceparent"] == traceparent_for(calls[1])
    assert PROPAGATION not in calls[1].attributes


@CLIENTS
def test_process_wide_allowlist_applies_to_instrumented_clients(
    exporter: InMemoryExporter, hosts: Hosts, kind: str
) -> None:
    mtm.configure(propagate_to=f"localhost:{urlsplit(hosts.trusted).port}")
    mtm.instrument()
    with mlflow.start_span("root"):
        get(kind, f"{hosts.trusted}/redirect?to={hosts.other}/target")
        get(kind, f"{hosts.other}/redirect?to={hosts.trusted}/target")
    received = hosts.received()
    calls = client_spans(exporter)
    assert len(calls) == 4
    assert received[0]["traceparent"] == traceparent_for(calls[0])
    assert not set(OURS) & set(received[1])
    assert not set(OURS) & set(received[2])
    assert received[3]["traceparent"] == traceparent_for(calls[3])


@CLIENTS
def test_environment_variable_applies_to_instrumented_clients(
    exporter: InMemoryExporter, hosts: Hosts, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_targets.ENV, "localhost")
    _config.reload()
    mtm.instrument()
    with mlflow.start_span("root"):
        get(kind, f"{hosts.trusted}/redirect?to={hosts.other}/target")
    first, second = hosts.received()
    assert "traceparent" in first
    assert not set(OURS) & set(second)


def test_a_transport_list_replaces_the_process_wide_one(
    exporter: InMemoryExporter, hosts: Hosts
) -> None:
    mtm.configure(propagate_to=["localhost"])
    mtm.instrument_httpx()  # the patched inner transport defers to the explicit outer one
    with mlflow.start_span("root"):
        get("httpx", f"{hosts.other}/echo", propagate_to=["127.0.0.2"])
        get("httpx", f"{hosts.trusted}/echo", propagate_to=["127.0.0.2"])
    allowed, blocked = client_spans(exporter)
    first, second = hosts.received()
    assert first["traceparent"] == traceparent_for(allowed)
    assert "traceparent" not in second
    assert blocked.attributes[PROPAGATION] == "blocked"


@CLIENTS
def test_a_hop_not_allowed_carries_no_context_even_without_an_active_span(
    exporter: InMemoryExporter, hosts: Hosts, kind: str
) -> None:
    forged = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    get(kind, f"{hosts.other}/echo", forged, propagate_to=["localhost"])
    get(kind, f"{hosts.trusted}/echo", forged, propagate_to=["localhost"])
    blocked, allowed = hosts.received()
    assert "traceparent" not in blocked
    assert allowed["traceparent"] == forged["traceparent"]  # not ours to touch
    assert client_spans(exporter) == []


@CLIENTS
def test_credentials_in_urls_are_never_recorded(
    exporter: InMemoryExporter, hosts: Hosts, kind: str
) -> None:
    trusted = urlsplit(hosts.trusted)
    url = f"http://alice:s3cret@{trusted.netloc}/echo?token=t0ken"
    with mlflow.start_span("root"):
        get(kind, url, propagate_to=["localhost"])
    (call,) = client_spans(exporter)
    assert call.attributes["url.full"] == f"{hosts.trusted}/echo"
    recorded = [call.name, *map(str, call.attributes.values())]
    assert not [text for text in recorded if any(s in text for s in ("alice", "s3cret", "t0ken"))]
    assert "traceparent" in hosts.received()[0]


def test_decisions_are_kept_per_origin_only_where_the_path_does_not_matter() -> None:
    targets = _targets.Targets(["api.internal", "https://gw.internal/v1", "*.svc"])
    for _ in range(2):  # the second round answers from what the first one kept
        assert targets.allows("http", "api.internal", None, "/x")
        assert targets.allows("http", "a.svc", 8080, "/")
        assert targets.allows("https", "gw.internal", None, "/v1/x")
        assert not targets.allows("https", "gw.internal", None, "/v2")
        assert not targets.allows("https", "gw.internal", None, "/v1/../v2")
        assert not targets.allows("http", "evil.test", None, "/")
    for port in range(1, _targets.MAX_ORIGINS + 10):
        assert targets.allows("http", "api.internal", port, "/")
    assert len(targets._decided) <= _targets.MAX_ORIGINS


def test_requests_urls_with_one_authority_share_its_parse_but_not_their_paths() -> None:
    for _ in range(2):
        assert mtm_requests._destination("http://api.internal:8080/a?q=1") == (
            "http",
            "api.internal",
            8080,
            "/a",
        )
        assert mtm_requests._destination("http://api.internal:8080/b") == (
            "http",
            "api.internal",
            8080,
            "/b",
        )
        assert mtm_requests._destination("http://a.test\\@b.test/") is None
