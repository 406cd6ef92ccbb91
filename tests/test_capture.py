"""Request and response bodies as span inputs and outputs: capture, limits, redaction."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import pytest
from flask import Flask, request
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlflow_trace_middleware import MlflowTracingMiddleware, MlflowTracingWSGIMiddleware, _config
from mlflow_trace_middleware._capture import BodyCapture, value_attribute
from mlflow_trace_middleware._redaction import (
    CREDENTIAL_KEYS,
    DEFAULT_REDACTION,
    ORDINARY_KEYS,
    Redaction,
    capturable_headers,
    words,
)
from mlflow_trace_middleware.testing import InMemoryExporter


def record(body: bytes, limit: int = 32 * 1024, redaction: Redaction = DEFAULT_REDACTION) -> str:
    """What a request span records for `body`, arriving in chunks of 7 bytes."""
    capture = BodyCapture(limit, redaction)
    for i in range(0, len(body), 7):
        capture.feed(body[i : i + 7])
    attribute = capture.attribute()
    assert attribute is not None
    return attribute


@pytest.mark.parametrize(
    ("body", "limit", "expected"),
    [
        pytest.param(b'{"a": 1}', 100, {"a": 1}, id="json"),
        pytest.param(
            b'{"token": "x", "nested": [{"Password": "y", "ok": 2}], "api-key": "z"}',
            100,
            {"token": "[REDACTED]", "nested": [{"Password": "[REDACTED]", "ok": 2}],
             "api-key": "[REDACTED]"},
            id="secrets-redacted",
        ),
        pytest.param(
            b'{"a": "' + b"x" * 50 + b'"}',
            10,
            "[body truncated: 59 bytes, capture limit 10]",
            id="truncated",
        ),
        pytest.param(b"{not json", 100, "[body is not valid JSON]", id="invalid"),
        pytest.param(b'{"max_tokens": 1,}', 100, "[body is not valid JSON]", id="invalid-slow"),
        pytest.param(
            b'{"note": "my token expired", "auth": {"scheme": "x"}}', 100,
            {"note": "my token expired", "auth": "[REDACTED]"}, id="secret-word-in-a-value",
        ),
        pytest.param(
            '{"secret": "s", "a": "\u00e9"}'.encode("utf-16"), 100,
            {"secret": "[REDACTED]", "a": "\u00e9"}, id="utf-16",
        ),
        pytest.param(
            '{"max_tokens": 5, "a": "\u00e9"}'.encode("utf-16"), 100,
            {"max_tokens": 5, "a": "\u00e9"}, id="utf-16-nothing-hidden",
        ),
        pytest.param(
            b'{"credentials": {"user": "u", "max_tokens": 3, "list": [1, {"a": 2}]}}', 100,
            {"credentials": "[REDACTED]"}, id="a-credential-hides-its-whole-value",
        ),
        pytest.param(
            b'[{"a": [{"b": {"refresh_token": "r", "total_tokens": 9}}]}]', 100,
            [{"a": [{"b": {"refresh_token": "[REDACTED]", "total_tokens": 9}}]}],
            id="at-any-depth",
        ),
        pytest.param(
            b'{"pass\\u0077ord": "p", "api\\u005fkey": "k", "\\u00e9": 1}', 100,
            {"password": "[REDACTED]", "api_key": "[REDACTED]", "\u00e9": 1}, id="escaped-keys",
        ),
        pytest.param(
            b'{"token": "a", "token": "b"}', 100, {"token": "[REDACTED]"}, id="duplicate-keys",
        ),
    ],
)  # fmt: skip
def test_body_capture(body: bytes, limit: int, expected: object) -> None:
    assert json.loads(record(body, limit)) == expected


def test_empty_body_is_not_recorded() -> None:
    assert BodyCapture(10).attribute() is None


def test_a_body_nested_too_deeply_is_marked() -> None:
    body = b"[" * 20_000 + b"]" * 20_000
    assert json.loads(record(body, limit=64 * 1024)) == "[body nested too deeply]"


OPENAI_REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Summarise my token usage", "author": "ana"}],
    "max_tokens": 256,
    "max_completion_tokens": 256,
    "session_id": "conv-42",
    "metadata": {"authority": "billing", "auth_method": "oauth", "tokenizer": "o200k"},
}
OPENAI_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "You used 52."}}],
    "usage": {
        "prompt_tokens": 38,
        "completion_tokens": 14,
        "total_tokens": 52,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
}


@pytest.mark.parametrize("body", [OPENAI_REQUEST, OPENAI_RESPONSE, {"q": "x\u00e9"}])
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_body_without_credential_keys_is_recorded_as_it_came(
    body: dict[str, Any], ensure_ascii: bool
) -> None:
    # Odd spacing and key order survive: the recorded text is the body, not a re-encoding.
    raw = json.dumps(body, indent=1, separators=(" ,", ":  "), ensure_ascii=ensure_ascii)
    assert record(raw.encode()) == raw


def test_an_openai_style_body_keeps_its_counts_and_loses_its_key() -> None:
    body = {**OPENAI_REQUEST, "api_key": "sk-live-1", "headers": {"Authorization": "Bearer b"}}
    recorded = record(json.dumps(body).encode())
    assert json.loads(recorded) == {
        **OPENAI_REQUEST,
        "api_key": "[REDACTED]",
        "headers": {"Authorization": "[REDACTED]"},
    }
    assert "sk-live-1" not in recorded
    assert "Bearer b" not in recorded


def tool_call(arguments: str) -> dict[str, Any]:
    """An OpenAI chat message whose tool call carries its arguments as JSON text."""
    function = {"name": "login", "arguments": arguments}
    return {
        "role": "assistant",
        "tool_calls": [{"id": "c1", "type": "function", "function": function}],
    }


def test_credentials_inside_json_encoded_strings_are_redacted() -> None:
    arguments = json.dumps({"user": "ann", "password": "hunter2", "retries": 3})
    body = {**OPENAI_REQUEST, "messages": [tool_call(arguments)]}
    recorded = json.loads(record(json.dumps(body).encode()))
    (call,) = recorded["messages"][0]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {
        "user": "ann",
        "password": "[REDACTED]",
        "retries": 3,
    }
    assert recorded["max_tokens"] == 256
    assert "hunter2" not in json.dumps(recorded)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(  # an array of JSON strings, twice encoded, at the top
            [json.dumps({"a": json.dumps({"token": "t0p"})})],
            [json.dumps({"a": json.dumps({"token": "[REDACTED]"})}, ensure_ascii=False)],
            id="nested-in-a-list",
        ),
        pytest.param(  # a top-level string holding JSON
            json.dumps([{"api_key": "k3y"}]),
            json.dumps([{"api_key": "[REDACTED]"}]),
            id="top-level-string",
        ),
        pytest.param(  # text that only looks like JSON, beside a credential
            {"note": "{not json", "q": "[1, 2", "secret": "s"},
            {"note": "{not json", "q": "[1, 2", "secret": "[REDACTED]"},
            id="not-json",
        ),
        pytest.param(  # JSON text without credentials is kept as it came, spacing and all
            {"arguments": '{"city":  "Paris"}', "password": "p"},
            {"arguments": '{"city":  "Paris"}', "password": "[REDACTED]"},
            id="kept-as-it-came",
        ),
    ],
)
def test_json_text_in_strings_is_redacted_wherever_it_is(body: Any, expected: Any) -> None:
    recorded = record(json.dumps(body).encode())
    assert json.loads(recorded) == expected


def test_json_text_spelled_with_escapes_is_redacted_too() -> None:
    # `{` written as `\u007b`: the text holds no more "{" than objects, yet a string holds JSON.
    raw = r'{"arguments": "\u007b\"token\": \"t0p\"}", "n": 1}'
    assert json.loads(json.loads(record(raw.encode()))["arguments"]) == {"token": "[REDACTED]"}


# Key -> hidden? The built-in policy, decided by what each key means.
KEYS = {
    # credentials
    "password": True, "Password": True, "PASSWORD": True, "passwd": True, "user_password": True,
    "newPassword": True, "password_confirmation": True, "passphrase": True, "passcode": True,
    "pwd": True, "secret": True, "client_secret": True, "clientSecret": True,
    "clientsecret": True, "SecretString": True, "aws_secret_access_key": True,
    "token": True, "Token": True, "access_token": True, "accessToken": True,
    "accesstoken": True, "refresh_token": True, "id_token": True, "auth_token": True,
    "X-Auth-Token": True, "sessionToken": True, "csrf_token": True, "github_token": True,
    "oauth2_token": True, "x-amz-security-token": True,
    "api_key": True, "apiKey": True, "APIKey": True, "apikey": True, "API_KEY": True,
    "x-api-key": True, "openai_api_key": True, "OPENAI_APIKEY": True, "api_key_2": True,
    "private_key": True, "privateKey": True, "secret_key": True, "access_key": True,
    "signing_key": True, "session_key": True, "subscription_key": True,
    "authorization": True, "Authorization": True, "proxy_authorization": True, "auth": True,
    "basic_auth": True, "oauth": True, "bearer": True, "jwt": True,
    "cookie": True, "cookies": True, "set-cookie": True, "Set-Cookie": True,
    "session_cookie": True, "credential": True, "credentials": True, "aws_credentials": True,
    "signature": True, "hmac_signature": True, "otp": True, "totp": True,
    "connection_string": True,
    # counts and ordinary fields
    "max_tokens": False, "max_completion_tokens": False, "maxOutputTokens": False,
    "max_new_tokens": False, "prompt_tokens": False, "completion_tokens": False,
    "total_tokens": False, "input_tokens": False, "output_tokens": False,
    "cached_tokens": False, "reasoning_tokens": False, "promptTokenCount": False,
    "totalTokenCount": False, "token_count": False, "tokens": False, "token_ids": False,
    "token_type": False, "tokenizer": False, "tokenizer_name": False, "tokenization": False,
    "author": False, "authors": False, "authority": False, "auth_method": False,
    "authType": False, "authenticated": False, "session_id": False, "sessionId": False,
    "session": False, "conversation_id": False, "thread_id": False, "page_token": False,
    "nextPageToken": False, "next_page_token": False, "continuation_token": False,
    "eos_token": False, "bos_token": False, "pad_token": False, "public_key": False,
    "key": False, "keys": False, "cache_key": False, "idempotency_key": False,
    "keyword": False, "api_key_id": False, "api_version": False, "model": False,
    "user": False, "messages": False, "content": False, "signed": False,
    "cookie_consent": False, "passenger": False, "compass": False, "otpauth_supported": False,
    "": False, "123": False, "_": False, "\u00e9t\u00e9": False,
}  # fmt: skip


def test_the_key_table_has_both_outcomes() -> None:
    outcomes = list(KEYS.values())
    assert len(KEYS) >= 60
    assert outcomes.count(True) >= 30
    assert outcomes.count(False) >= 30


@pytest.mark.parametrize(("key", "hidden"), KEYS.items())
def test_keys_are_redacted_by_what_they_mean(key: str, hidden: bool) -> None:
    assert DEFAULT_REDACTION.hides(key) is hidden
    secret = "s3cr3t-value"
    recorded = json.loads(record(json.dumps({key: secret, "n": 1}).encode()))
    assert recorded == {key: "[REDACTED]" if hidden else secret, "n": 1}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("prompt_tokens", ("prompt", "tokens")),
        ("promptTokens", ("prompt", "tokens")),
        ("Prompt-Tokens", ("prompt", "tokens")),
        ("PROMPT_TOKENS", ("prompt", "tokens")),
        ("APIKey", ("api", "key")),
        ("X-API-KEY", ("x", "api", "key")),
        ("oauth2Token", ("oauth", "token")),
        ("usage.total_tokens", ("usage", "total", "tokens")),
        ("session id", ("session", "id")),
        ("", ()),
    ],
)
def test_keys_are_split_into_words(key: str, expected: tuple[str, ...]) -> None:
    assert words(key) == expected


def test_the_documented_lists_are_what_the_policy_uses() -> None:
    for name in CREDENTIAL_KEYS:
        assert DEFAULT_REDACTION.hides(name), name
    for name in ORDINARY_KEYS:
        assert not DEFAULT_REDACTION.hides(name), name


# Spellings of a credential name, as clients write them.
def spellings(name: str) -> list[str]:
    parts = name.split("_")
    camel = parts[0] + "".join(p.title() for p in parts[1:])
    return [
        name,
        name.upper(),
        "-".join(parts),
        "-".join(p.title() for p in parts),
        camel,
        camel[0].upper() + camel[1:],
        "".join(parts),
    ]


PREFIXES = ["", "x_", "X-", "my", "openai_", "user", "github_", "aws_", "new_", "old", "client_"]
CREDENTIAL_SPELLINGS = sorted(
    {p + spelled for name in CREDENTIAL_KEYS for spelled in spellings(name) for p in PREFIXES}
)
SECRET = st.text("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=12, max_size=24).map(
    lambda s: f"SK-{s}"
)
FILLER_TEXT = st.text("abcdefghijklmnopqrstuvwxyz _", max_size=12)
FILLER = st.recursive(
    st.none() | st.booleans() | st.integers() | FILLER_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(FILLER_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)


def _place(container: Any, path: list[int], key: str, value: Any) -> Any:
    """`container` with {key: value} put somewhere inside it (by `path`)."""
    if isinstance(container, dict) and container and path:
        inner = sorted(container)[path[0] % len(container)]
        return {**container, inner: _place(container[inner], path[1:], key, value)}
    if isinstance(container, list) and container and path:
        i = path[0] % len(container)
        return [*container[:i], _place(container[i], path[1:], key, value), *container[i + 1 :]]
    if isinstance(container, dict):
        return {**container, key: value}
    return {"wrapped": container, key: value}


def _place_value(container: Any, path: list[int], value: str) -> Any:
    """`container` with `value` (JSON text) as a string value somewhere inside it."""
    if isinstance(container, dict) and container and path:
        inner = sorted(container)[path[0] % len(container)]
        return {**container, inner: _place_value(container[inner], path[1:], value)}
    if isinstance(container, list) and path:
        return [*container[: path[0]], value, *container[path[0] :]]
    if isinstance(container, dict):
        return {**container, "arguments": value}
    return [container, value]


@settings(max_examples=500, deadline=None)
@given(
    key=st.sampled_from(CREDENTIAL_SPELLINGS),
    secret=SECRET,
    shape=st.sampled_from(["plain", "in-object", "in-list"]),
    filler=FILLER,
    path=st.lists(st.integers(0, 7), max_size=6),
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 2]),
    encodings=st.lists(
        st.tuples(FILLER, st.lists(st.integers(0, 7), max_size=3), st.sampled_from([None, 2])),
        max_size=2,
    ),
)
@example(
    key="client_secret", secret="SK-AAAAAAAAAAAA", shape="plain", filler={}, path=[],
    ensure_ascii=True, indent=None, encodings=[],
)  # fmt: skip
@example(  # OpenAI: `tool_calls[].function.arguments` is JSON text
    key="password", secret="SK-BBBBBBBBBBBB", shape="plain", filler={}, path=[],
    ensure_ascii=False, indent=None, encodings=[({"arguments": None}, [], None)],
)  # fmt: skip
def test_a_value_under_a_credential_key_is_never_recorded(
    key: str,
    secret: str,
    shape: str,
    filler: Any,
    path: list[int],
    ensure_ascii: bool,
    indent: int | None,
    encodings: list[tuple[Any, list[int], int | None]],
) -> None:
    value: Any = {
        "plain": secret,
        "in-object": {"user": "u", "value": secret, "max_tokens": 1},
        "in-list": [1, [secret]],
    }[shape]
    body: Any = _place(filler, path, key, value)
    # The body so far as JSON text, as a string value in a larger body (once or twice).
    for outer, where, spacing in encodings:
        text = json.dumps(body, ensure_ascii=ensure_ascii, indent=spacing)
        body = _place_value(outer, where, text)
    raw = json.dumps(body, ensure_ascii=ensure_ascii, indent=indent)
    recorded = record(raw.encode())
    assert secret not in recorded
    assert secret not in json.dumps(json.loads(recorded), ensure_ascii=False)


@settings(max_examples=500, deadline=None)
@given(
    key=st.text(max_size=20)
    | st.builds(
        lambda a, name, b: a + name + b,
        st.text(max_size=6),
        st.sampled_from(CREDENTIAL_SPELLINGS + list(ORDINARY_KEYS)),
        st.text(max_size=6),
    ),
    ensure_ascii=st.booleans(),
)
def test_the_cheap_scan_never_misses_a_key_the_policy_hides(key: str, ensure_ascii: bool) -> None:
    body = json.dumps({key: 1}, ensure_ascii=ensure_ascii)
    if DEFAULT_REDACTION.hides(key):
        assert DEFAULT_REDACTION.may_hide(body)


def test_the_cheap_scan_lets_ordinary_bodies_through() -> None:
    assert not DEFAULT_REDACTION.may_hide(json.dumps({"question": "Which region?", "n": 3}))
    assert DEFAULT_REDACTION.may_hide(json.dumps({"k\u00e9y": 1}))  # escaped: decided exactly


# Options: redact_keys / keep_keys and their environment variables.


def test_redact_keys_add_names_in_every_spelling() -> None:
    policy = Redaction.build(redact_keys=["user_email", "ssn"])
    body = {"user_email": "a@b", "billingUserEmail": "c@d", "SSN": "1", "email": "e", "n": 1}
    assert json.loads(record(json.dumps(body).encode(), redaction=policy)) == {
        "user_email": "[REDACTED]",
        "billingUserEmail": "[REDACTED]",
        "SSN": "[REDACTED]",
        "email": "e",
        "n": 1,
    }


def test_keep_keys_show_names_the_built_in_list_hides() -> None:
    policy = Redaction.build(keep_keys=["token", "csrf-token"])
    body = {"token": "t", "csrfToken": "c", "access_token": "a", "password": "p"}
    assert json.loads(record(json.dumps(body).encode(), redaction=policy)) == {
        "token": "t",
        "csrfToken": "c",
        "access_token": "[REDACTED]",  # a more specific built-in name still decides
        "password": "[REDACTED]",
    }


REDACT_KEYS_ENV = "MLFLOW_TRACE_REDACT_KEYS"
KEEP_KEYS_ENV = "MLFLOW_TRACE_KEEP_KEYS"


def build(environ: dict[str, str], **arguments: list[str]) -> Redaction:
    """The policy a middleware gets: the settings read from `environ`, `arguments` on top."""
    settings = _config.from_environment(environ)
    return Redaction.build(
        **arguments, base_redact=settings.redact_keys, base_keep=settings.keep_keys
    )


def test_a_kept_name_is_the_most_specific_rule() -> None:
    policy = build({}, keep_keys=["secret_name"], redact_keys=["page_token"])
    assert not policy.hides("secretName")
    assert policy.hides("secret_value")
    assert policy.hides("nextPageToken")


def test_the_variables_are_read_and_the_arguments_win(caplog: pytest.LogCaptureFixture) -> None:
    env = {REDACT_KEYS_ENV: " user_email, ,tenant-id,", KEEP_KEYS_ENV: "page_token,csrf_token"}
    policy = build(env)
    assert policy.hides("userEmail")
    assert policy.hides("tenant_id")
    assert not policy.hides("csrf_token")
    assert not policy.hides("page_token")
    overridden = build(env, redact_keys=["csrf_token"], keep_keys=["tenant_id"])
    assert overridden.hides("csrf_token")
    assert not overridden.hides("tenant_id")
    assert overridden.hides("user_email")
    both = build({REDACT_KEYS_ENV: "x_id", KEEP_KEYS_ENV: "x-id,--"})
    assert both.hides("x_id")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(KEEP_KEYS_ENV in m and "not a key name" in m for m in messages)
    assert any("redacted" in m and REDACT_KEYS_ENV in m for m in messages)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"redact_keys": "password"}, "redact_keys must be a collection"),
        ({"keep_keys": "token"}, "keep_keys must be a collection"),
        ({"redact_keys": ["tenant"], "keep_keys": ["Tenant"]}, "both redacted and kept: tenant"),
        ({"redact_keys": ["--"]}, "not a key name"),
        ({"keep_keys": [3]}, "not a key name"),
    ],
)
def test_invalid_options_are_refused(options: dict[str, Any], error: str) -> None:
    for middleware in (MlflowTracingMiddleware, MlflowTracingWSGIMiddleware):
        with pytest.raises(ValueError, match=error):
            middleware(lambda *a: None, **options)


def test_header_capture_refuses_what_the_policy_hides() -> None:
    with pytest.raises(ValueError, match="x-tenant-secret-id"):
        MlflowTracingMiddleware(
            lambda *a: None,
            capture_headers=["x-tenant-secret-id"],
            keep_keys=["x-tenant-secret-id"],
        )
    policy = Redaction.build(redact_keys=["x-tenant"], keep_keys=["session_id"])
    with pytest.raises(ValueError, match="x-tenant"):
        capturable_headers(["X-Tenant"], policy)
    with pytest.raises(ValueError, match="x-session-id"):
        capturable_headers(["x-session-id"], policy)
    assert capturable_headers(["x-team"], policy) == {"x-team"}


async def _echo_json(scope: Any, receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def test_the_asgi_middleware_applies_its_options(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REDACT_KEYS_ENV, "tenant")
    _config.reload()
    app = MlflowTracingMiddleware(
        _echo_json, redact_keys=["user_email"], keep_keys=["page_token"], instrument_clients=False
    )
    body = json.dumps({"user_email": "a@b", "tenant": "t", "pageToken": "p2", "token": "x"})
    chunks = [body.encode()[:10], body.encode()[10:]]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: Any) -> None:
        pass

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/p",
        "headers": [(b"content-type", b"application/json")],
    }
    asyncio.run(app(scope, receive, send))
    (span,) = exporter.finished_spans()
    expected = {"user_email": "[REDACTED]", "tenant": "[REDACTED]", "pageToken": "p2"}
    expected["token"] = "[REDACTED]"
    attributes = dict(span.attributes or {})
    assert json.loads(str(attributes["mlflow.spanInputs"])) == expected
    assert json.loads(str(attributes["mlflow.spanOutputs"])) == expected


def test_the_wsgi_middleware_applies_the_variables(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEEP_KEYS_ENV, "token")
    monkeypatch.setenv(REDACT_KEYS_ENV, "tenant")
    _config.reload()
    flask = Flask(__name__)
    flask.post("/p")(lambda: dict(request.get_json()))
    flask.wsgi_app = MlflowTracingWSGIMiddleware(  # type: ignore[method-assign]
        flask.wsgi_app, instrument_clients=False
    )
    response = flask.test_client().post("/p", json={"token": "t", "tenant": "x", "pwd": "p"})
    response.close()
    (span,) = exporter.finished_spans()
    attributes = dict(span.attributes or {})
    expected = {"token": "t", "tenant": "[REDACTED]", "pwd": "[REDACTED]"}
    assert json.loads(str(attributes["mlflow.spanInputs"])) == expected
    assert json.loads(str(attributes["mlflow.spanOutputs"])) == expected


circular: list[Any] = []
circular.append(circular)


@pytest.mark.parametrize(
    ("value", "limit", "recorded"),
    [
        pytest.param({"key": "k", "n": 1}, 100, '{"key": "k", "n": 1}', id="as-encoded"),
        pytest.param({"api_key": "sk"}, 100, '{"api_key": "[REDACTED]"}', id="redacted"),
        pytest.param(
            {"args": '{"password": "p"}'},
            100,
            '{"args": "{\\"password\\": \\"[REDACTED]\\"}"}',
            id="json-text-inside",
        ),
        pytest.param(
            {"t": "é" * 4},
            16,
            '"[body truncated: 17 bytes, capture limit 16]"',
            id="bytes-not-chars",
        ),
        pytest.param({"t": "é" * 4}, 17, '{"t": "éééé"}', id="at-the-limit"),
        pytest.param({"a": 1}, 0, None, id="off"),
        pytest.param(None, 100, None, id="none"),
        pytest.param(circular, 100, '"[value is not JSON]"', id="circular"),
    ],
)
def test_a_decoded_value_is_recorded_as_its_encoding_would_be_as_a_body(
    value: Any, limit: int, recorded: str | None
) -> None:
    assert value_attribute(value, limit) == recorded
    if recorded is not None and not recorded.startswith('"['):  # what a body of it would give
        assert record(json.dumps(value, ensure_ascii=False).encode(), limit) == recorded


@pytest.mark.parametrize(
    ("body", "edited"),
    [
        pytest.param(b'{"params": {"a": 1, "_meta": {"x": 2}}}', '{"params": {"a": 1}}', id="meta"),
        pytest.param(b'{"params": {"a": 1}}', '{"params": {"a": 1}}', id="nothing-to-do"),
        pytest.param(b'{"_meta": 1', '"[body is not valid JSON]"', id="invalid"),
        pytest.param(
            b'{"params": {"_meta": 1}} ',
            '"[body truncated: 25 bytes, capture limit 24]"',
            id="truncated",
        ),
    ],
)
def test_a_captured_body_can_be_edited_before_it_is_recorded(body: bytes, edited: str) -> None:
    def drop(message: Any) -> bool:
        params = message.get("params") if isinstance(message, dict) else None
        return isinstance(params, dict) and params.pop("_meta", None) is not None

    capture = BodyCapture(24 if body.endswith(b" ") else 1024)
    capture.feed(body)
    capture.edit(drop, b'"_meta"')
    assert capture.attribute() == edited


def test_bodies_are_checked_off_the_request_path_and_exported_redacted(
    exporter: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The credential scan runs on the sink's worker, not the request's thread; what is exported
    # is redacted all the same, a credential key in JSON text inside a string too.
    threads: list[str] = []
    mentions = Redaction.mentions

    def scanning(self: Redaction, text: str) -> bool:
        threads.append(threading.current_thread().name)
        return mentions(self, text)

    monkeypatch.setattr(Redaction, "mentions", scanning)
    app = MlflowTracingMiddleware(_echo_json, instrument_clients=False)
    body = json.dumps({"user": "a", "api_key": "sk-1", "note": json.dumps({"password": "p4ss"})})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body.encode(), "more_body": False}

    async def send(message: Any) -> None:
        pass

    headers = [(b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/p", "headers": headers}
    asyncio.run(app(scope, receive, send))
    assert threads == []
    (span,) = exporter.finished_spans()
    assert threads == ["mlflow-trace-sink"] * 2  # the request's body and the response's
    for key in ("mlflow.spanInputs", "mlflow.spanOutputs"):
        recorded = json.loads(str((span.attributes or {})[key]))
        assert recorded["api_key"] == "[REDACTED]"
        assert json.loads(recorded["note"]) == {"password": "[REDACTED]"}
    assert "sk-1" not in str(span.attributes)
    assert "p4ss" not in str(span.attributes)
