"""Where outgoing trace context may go: an allowlist checked on every hop, redirects included.

Patterns, parsed once (an invalid one raises ValueError):

- `api.internal`: exactly this host, any port. Case and one trailing dot are ignored,
  internationalised names compare in their IDNA (punycode) form.
- `api.internal:8443`: this host on this port only (the scheme's default port when the URL
  names none).
- `*.internal`: any host below `internal`, at a label boundary (`a.internal`, `a.b.internal`),
  not `internal` itself (list it too) and not `evilinternal`. A port may follow.
- `127.0.0.1`, `[::1]`, `[::1]:8443`: IP addresses match exactly (IPv6 in brackets, compared in
  canonical form). A name never matches an address it resolves to: nothing is resolved.
- `https://api.internal:8443/v1`: a URL prefix: scheme, host and effective port exactly, and the
  path at a segment boundary (`/v1` and `/v1/x`, not `/v10`), compared percent-encoded, as sent.
  A path with dot segments or an encoded `.`, `/` or `\\` never matches a prefix (a server could
  normalise it onto another one).
- `*`: everywhere.

Hosts are matched as the HTTP client will connect, from the client's own parse of the URL
(`user@api.internal@evil.test` connects to `evil.test`), never by a string check on the URL.
A host that no DNS name or IP literal can spell (`%`, `@`, empty labels...) matches nothing.

The process-wide list is a setting (`_config`: `configure(propagate_to=...)` or
`MLFLOW_TRACE_PROPAGATE_TO`, comma-separated); by default context goes everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

from . import _log

ENV = "MLFLOW_TRACE_PROPAGATE_TO"

Patterns = str | Iterable[str]
# (scheme, host, port, path) as the client will connect and send; host without IPv6 brackets.
Destination = tuple[str, str, int | None, str]

DEFAULT_PORTS = {"http": 80, "https": 443}
_HOSTNAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")
_MAX_HOSTNAME = 253
# Segments a server may resolve or decode onto another path (RFC 3986 section 5.2.4).
_UNSAFE_PATH = re.compile(r"%2e|%2f|%5c|\\|(?:^|/)\.\.?(?:/|$)", re.IGNORECASE)


class Targets:
    """A parsed allowlist; `allows()` is a few set look-ups, and one once an origin was seen.

    ```python
    targets = Targets(["api.internal", "*.svc.cluster.local", "https://gw.example:8443/v1"])
    targets.allows("https", "gw.example", 8443, "/v1/chat")   # True
    ```
    """

    __slots__ = (
        "_decided",
        "_domain_ports",
        "_domains",
        "_everything",
        "_host_ports",
        "_hosts",
        "_prefixes",
    )

    def __init__(self, patterns: Patterns) -> None:
        if isinstance(patterns, str):
            patterns = [item for item in patterns.split(",") if item.strip()]
        self._everything = False
        self._hosts: set[str] = set()  # any port
        self._host_ports: set[tuple[str, int]] = set()
        self._domains: set[str] = set()  # "*.internal" is stored as "internal"
        self._domain_ports: set[tuple[str, int]] = set()
        # (scheme, host, port) -> path prefixes, without their trailing "/" ("" is the origin)
        self._prefixes: dict[tuple[str, str, int], tuple[str, ...]] = {}
        # (scheme, host, port) as given -> the decision, for origins whose decision does not
        # depend on the path (bounded: cleared when full).
        self._decided: dict[tuple[str, str, int | None], bool] = {}
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"propagation targets are strings, not {pattern!r}")
            self._add(pattern.strip())

    def _add(self, pattern: str) -> None:
        try:
            if not pattern:
                raise ValueError("empty")
            if pattern == "*":
                self._everything = True
            elif "://" in pattern:
                origin, path = _url_prefix(pattern)
                self._prefixes[origin] = (*self._prefixes.get(origin, ()), path)
            elif pattern.startswith("*."):
                domain, port = _host_and_port(pattern[2:])
                if _is_ip(domain):
                    raise ValueError("'*.' goes before a domain name, not an IP address")
                _put(domain, port, self._domains, self._domain_ports)
            else:
                host, port = _host_and_port(pattern)
                _put(host, port, self._hosts, self._host_ports)
        except ValueError as exc:
            raise ValueError(f"invalid propagation target {pattern!r}: {exc}") from None

    def allows(self, scheme: str, host: str, port: int | None, path: str) -> bool:
        """Whether context may go to this destination (`host` as the client connects to it)."""
        if self._everything:
            return True
        origin = (scheme, host, port)
        decided = self._decided.get(origin)
        if decided is not None:
            return decided
        prefixes = self._origin(scheme, host, port)
        if isinstance(prefixes, bool):
            if len(self._decided) >= MAX_ORIGINS:
                self._decided.clear()
            self._decided[origin] = prefixes
            return prefixes
        if _UNSAFE_PATH.search(path):
            return False
        return any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)

    def _origin(self, scheme: str, host: str, port: int | None) -> bool | tuple[str, ...]:
        """The decision for an origin, or the path prefixes it depends on."""
        scheme = scheme.lower()
        name = _connect_host(host)
        if name is None:
            return False
        if port is None:
            port = DEFAULT_PORTS.get(scheme)
        if name in self._hosts or (name, port) in self._host_ports:
            return True
        if ":" not in name and (self._domains or self._domain_ports):
            dot = name.find(".")
            while dot != -1:
                domain = name[dot + 1 :]
                if domain in self._domains or (domain, port) in self._domain_ports:
                    return True
                dot = name.find(".", dot + 1)
        if port is None:
            return False
        prefixes = self._prefixes.get((scheme, name, port))
        if not prefixes:
            return False
        return True if "" in prefixes else prefixes


MAX_ORIGINS = 1024


def _put(host: str, port: int | None, any_port: set[str], ports: set[tuple[str, int]]) -> None:
    if port is None:
        any_port.add(host)
    else:
        ports.add((host, port))


def _host_and_port(text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port`; the host normalised as `allows` compares it."""
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError("missing ']' after the IPv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError("unexpected text after ']'")
        return _ipv6(address), _port(rest[1:]) if rest else None
    host, colon, port = text.rpartition(":")
    if not colon:
        return _hostname(text), None
    if ":" in host:
        raise ValueError("IPv6 addresses go in brackets: [::1] or [::1]:8443")
    return _hostname(host), _port(port)


def _hostname(text: str) -> str:
    if "*" in text:
        raise ValueError("a wildcard may only be a leading '*.' label")
    if any(c in text for c in "/@?#"):
        raise ValueError("a host has no '/', '@', '?' or '#'; for a path, use a URL prefix")
    host = text.lower()
    if not host.isascii():
        host = _idna(host)
    if host.endswith("."):
        host = host[:-1]
    if len(host) > _MAX_HOSTNAME or not _HOSTNAME.fullmatch(host):
        raise ValueError("not a valid host name")
    if host.rpartition(".")[2].isdigit():
        # A numeric last label is an IPv4 address; only the canonical form is what clients send.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError("not an IPv4 address in dotted decimal, no leading zeros") from None
    return host


def _idna(host: str) -> str:
    try:
        import idna  # what httpx and requests use

        return idna.encode(host).decode("ascii")
    except ImportError:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:  # idna.IDNAError is one
        raise ValueError(f"not a valid internationalised host name ({exc})") from None


def _ipv6(text: str) -> str:
    if "%" in text:
        raise ValueError("IPv6 zone ids are not supported")
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        raise ValueError("not a valid IPv6 address") from None


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError("a port is a number from 1 to 65535")
    return int(text)


def _is_ip(host: str) -> bool:
    return ":" in host or host.rpartition(".")[2].isdigit()


def _url_prefix(pattern: str) -> tuple[tuple[str, str, int], str]:
    scheme, _, rest = pattern.partition("://")
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("a URL prefix starts with http:// or https://")
    if any(c in rest for c in "?#"):
        raise ValueError("a URL prefix has no query or fragment")
    slash = rest.find("/")
    authority, path = (rest, "") if slash == -1 else (rest[:slash], rest[slash:])
    if "@" in authority:
        raise ValueError("a URL prefix has no user info")
    if authority.startswith("*"):
        raise ValueError("a URL prefix names one host; use '*.domain' without a scheme instead")
    host, port = _host_and_port(authority)
    if not path.isascii() or _UNSAFE_PATH.search(path):
        raise ValueError("the path must be ASCII (percent-encoded) without dot segments")
    return (scheme, host, port or DEFAULT_PORTS[scheme]), path.rstrip("/")


def _connect_host(host: str) -> str | None:
    """The host in the form patterns are stored in; None if no DNS name or IP literal is it."""
    host = host.lower()
    if host.startswith("["):
        host = host[1:-1] if host.endswith("]") else host
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host).compressed if "%" not in host else None
        except ValueError:
            return None
    if host.endswith("."):
        host = host[:-1]
    if len(host) > _MAX_HOSTNAME or not _HOSTNAME.fullmatch(host):
        return None
    return host


def parse(patterns: Patterns | None) -> Targets | None:
    """`Targets(patterns)`, or None for None (validates at configuration time)."""
    return None if patterns is None else Targets(patterns)


def lenient(raw: str) -> Targets:
    """A service's reading of `MLFLOW_TRACE_PROPAGATE_TO`: an invalid entry is logged and
    skipped, so it allows nothing (never everything)."""
    valid = []
    for item in raw.split(","):
        if not item.strip():
            continue
        try:
            Targets([item])
        except ValueError as exc:
            _log.logger.warning("mlflow-trace-middleware: ignoring an entry of %s: %s", ENV, exc)
            continue
        valid.append(item)
    return Targets(valid)


def permits(targets: Targets | None, destination: Callable[[], Destination | None]) -> bool:
    """Whether this hop may carry context under `targets` (None: everywhere).

    `destination` is computed only when a list applies; None (a URL the client's parsers
    disagree on) and any failure here mean no.
    """
    if targets is None:
        return True
    try:
        where = destination()
        return where is not None and targets.allows(*where)
    except Exception:
        _log.internal_error("propagation targets")
        return False
