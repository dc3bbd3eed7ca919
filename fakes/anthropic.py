"""A local fake of Anthropic's Messages API (`POST /v1/messages`), streaming and not.

It speaks the documented wire protocol (https://docs.anthropic.com/en/api/messages,
/en/api/messages-streaming, /en/api/errors, /en/docs/build-with-claude/prompt-caching):

* auth and versioning: `x-api-key` (401 `authentication_error`), `anthropic-version` (400), `anthropic-beta`
  (comma-separated dated beta names; anything else is 400), `request-id` on every response and `request_id` in
  every error body;
* request validation like the API's: required `model` / `max_tokens` / `messages`, roles, content blocks,
  `system` as a string or text blocks, `cache_control` (at most 4 breakpoints), sampling ranges, `thinking`,
  `tools`, `stop_sequences`, unknown top-level fields ("Extra inputs are not permitted"), unknown model (404
  `not_found_error`), `max_tokens` above the model's limit, prefill on models that dropped it;
* the SSE stream: `message_start`, `content_block_start`, `ping`, `content_block_delta` (`text_delta`) ...,
  `content_block_stop`, `message_delta` (stop_reason `end_turn` / `max_tokens` / `stop_sequence`, cumulative
  usage), `message_stop`; and the mid-stream `error` event;
* usage: deterministic token estimates (~4 characters per input token; one output token per streamed word-ish
  delta, so `max_tokens` truncates exactly), and prompt caching: the first request with a cached prefix reports
  `cache_creation_input_tokens`, later requests with the same prefix (same model, within the TTL) report
  `cache_read_input_tokens`, and `input_tokens` counts only the uncached rest.

Scripting (thread-safe, callable from the test thread while the fake serves): `fail_next`, `fail_always`,
`stall_next`, `error_mid_stream_next`, `clear_faults`; latency via `first_token_delay` and `tokens_per_second`.
Faults are queued in the order scripted; each valid request (past auth and validation) takes the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import string
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from fakes.base import ClientGone, FakeServer, RecordedRequest

API_VERSIONS = ("2023-06-01", "2023-01-01")

# alias or snapshot id -> (snapshot id reported back in `model`, max output tokens)
KNOWN_MODELS: dict[str, tuple[str, int]] = {}


def _add_model(snapshot: str, max_out: int, *aliases: str) -> None:
    for name in (snapshot, *aliases):
        KNOWN_MODELS[name] = (snapshot, max_out)


_add_model("claude-haiku-4-5-20251001", 64_000, "claude-haiku-4-5")
_add_model("claude-sonnet-4-5-20250929", 64_000, "claude-sonnet-4-5")
_add_model("claude-opus-4-5-20251101", 64_000, "claude-opus-4-5")
_add_model("claude-opus-4-1-20250805", 32_000, "claude-opus-4-1")
_add_model("claude-opus-4-20250514", 32_000, "claude-opus-4-0")
_add_model("claude-sonnet-4-20250514", 64_000, "claude-sonnet-4-0")
_add_model("claude-3-7-sonnet-20250219", 64_000, "claude-3-7-sonnet-latest")
_add_model("claude-3-5-haiku-20241022", 8_192, "claude-3-5-haiku-latest")
_add_model("claude-3-5-sonnet-20241022", 8_192, "claude-3-5-sonnet-latest")
_add_model("claude-3-haiku-20240307", 4_096)
_add_model("claude-3-opus-20240229", 4_096, "claude-3-opus-latest")


def _sdk_model_ids() -> list[str]:
    """The model ids the installed anthropic SDK lists (its `ModelParam` literals), so the fake keeps up with it."""
    try:
        from anthropic.types.model_param import ModelParam
    except Exception:  # noqa: BLE001 - the SDK is optional for the fake itself
        return []

    def literals(tp: Any) -> list[str]:
        out: list[str] = []
        for arg in typing.get_args(tp):
            if isinstance(arg, str):
                out.append(arg)
            else:
                out += literals(arg)
        return out

    return literals(ModelParam)


DEFAULT_MODELS: frozenset[str] = frozenset(KNOWN_MODELS) | frozenset(_sdk_model_ids())

# Models documented to accept a conversation ending in an assistant turn (prefill); same list as Pipecat's.
_PREFILL_PREFIXES = (
    "claude-2",
    "claude-instant",
    "claude-3",
    "claude-opus-4-0",
    "claude-opus-4-1",
    "claude-opus-4-2",
    "claude-sonnet-4-0",
    "claude-sonnet-4-2",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
)

ALLOWED_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "output_config",
        "output_format",
        "context_management",
        "cache_control",
        "compaction",
        "diagnostics",
        "inference_geo",
        "speed",
        "fallbacks",
        "fallback_credit_token",
    }
)
_BLOCK_TYPES = frozenset(
    {
        "text",
        "image",
        "document",
        "search_result",
        "tool_use",
        "tool_result",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "container_upload",
        "mcp_tool_use",
        "mcp_tool_result",
        "compaction",
    }
)
_BETA_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*-\d{4}-\d{2}-\d{2}$")
_TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_WORD_RE = re.compile(r"\s*\S+")
_B62 = string.ascii_letters + string.digits
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ERROR_MESSAGES = {
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit "
    "(https://docs.anthropic.com/en/api/rate-limits); see the response headers for current usage.",
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "timeout_error": "Request timeout",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "billing_error": "Your credit balance is too low to access the Anthropic API.",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "not_found_error": "Not Found",
    "authentication_error": "invalid x-api-key",
    "invalid_request_error": "Invalid request",
}


def _rand_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_B62) for _ in range(24))


def estimate_tokens(text: str) -> int:
    """Deterministic token estimate for input text: about 4 characters per token, at least 1."""
    return max(1, (len(text) + 3) // 4)


def split_tokens(text: str) -> list[str]:
    """The reply split into word-ish stream tokens (each with its leading whitespace); they join back to `text`."""
    toks = _WORD_RE.findall(text)
    if toks:
        toks[-1] += text[len("".join(toks)) :]  # trailing whitespace, if any
    return toks


def last_user_text(messages: list[dict]) -> str:
    """The text of the last user message (its text blocks joined), or ""."""
    for msg in reversed(messages or []):
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]
        if texts:
            return " ".join(texts)
    return ""


def default_reply(body: dict) -> str:
    """A short friendly deterministic reply quoting the last user message."""
    quote = " ".join(last_user_text(body.get("messages") or []).split()).rstrip(" .!?…") or "something"
    if len(quote) > 200:
        quote = quote[:200].rsplit(" ", 1)[0] + "..."
    return f"I heard you say: {quote}. That sounds lovely. Tell me more about it."


class AnthropicAPIError(Exception):
    """An error the fake answers with: HTTP `status` and Anthropic's `{"type":"error","error":{...}}` body."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.error_type = error_type or _ERROR_TYPES.get(status, "api_error")
        self.message = message or _ERROR_MESSAGES.get(self.error_type, "Error")
        self.headers = headers or {}
        super().__init__(f"{status} {self.error_type}: {self.message}")


@dataclass
class AnthropicRequest(RecordedRequest):
    """A recorded Messages request plus what the fake did with it."""

    request_id: str = ""
    stream: bool = False
    deltas_sent: int = 0  # text deltas written before the stream ended (or the client left)
    text_sent: str = ""  # the reply text actually written
    stop_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    fault: str | None = None  # "fail", "stall", "error_mid_stream" when a scripted fault applied
    disconnected_at: float | None = None  # time.monotonic() when the fake noticed the client left


_ClientGone = ClientGone


@dataclass
class _Fault:
    kind: str  # "fail" | "stall" | "error_mid_stream"
    status: int = 0
    retry_after: float | None = None
    seconds: float = 0.0
    after_deltas: int = 3


@dataclass
class _Segment:
    key: str
    tokens: int
    cache_control: dict | None


class FakeAnthropic(FakeServer):
    """Fake `api.anthropic.com`: point `AsyncAnthropic(base_url=fake.http_url)` at it."""

    request_class = AnthropicRequest

    def __init__(
        self,
        *,
        api_key: str = "test-anthropic-key",
        models: Iterable[str] | None = None,
        reply: Callable[[dict], str] | None = None,
        first_token_delay: float = 0.0,
        tokens_per_second: float = 0,
        cache_min_tokens: int = 0,
    ) -> None:
        """
        Args:
            api_key: the only `x-api-key` accepted.
            models: model ids accepted (others get 404 `not_found_error`); default: the well-known current and
                legacy ids plus every id the installed SDK lists. Aliases report their snapshot id back.
            reply: request body -> reply text; default `default_reply` (quotes the last user message).
            first_token_delay: seconds before the response starts (headers + `message_start`), i.e. time to
                first token; the client's `create()` returns only then, as with the real API.
            tokens_per_second: pace the text deltas (one word-ish token each); 0 sends them back to back.
            cache_min_tokens: shortest prefix that gets cached. The API's documented minimum is 1024-4096
                tokens by model; the default 0 lets short test prompts exercise caching.
        """
        super().__init__()
        self.api_key = api_key
        self.models: frozenset[str] = frozenset(models) if models is not None else DEFAULT_MODELS
        self.reply = reply or default_reply
        self.first_token_delay = first_token_delay
        self.tokens_per_second = tokens_per_second
        self.cache_min_tokens = cache_min_tokens
        self.requests: list[AnthropicRequest] = []  # type: ignore[assignment]
        self.completed = 0  # requests answered in full (message_stop sent / Message JSON returned)
        self._lock = threading.Lock()
        self._faults = self._fault_queue()
        self._cache: dict[str, float] = {}  # prefix hash -> expiry (time.monotonic())
        self.app.router.add_post("/v1/messages", self._messages)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)

    # ---- scripting (any thread) ---------------------------------------------------------------------------

    def fail_next(self, status: int, times: int = 1, retry_after: float | None = None) -> None:
        """The next `times` valid requests get HTTP `status` with Anthropic's error body for it (429
        `rate_limit_error`, 529 `overloaded_error`, 500 `api_error`, ...), plus `retry-after` when given."""
        self._faults.add(_Fault("fail", status=status, retry_after=retry_after), times)

    def fail_always(self, status: int) -> None:
        """Every request (past auth and validation) fails with `status` until `clear_faults()`."""
        self._faults.set_always(_Fault("fail", status=status))

    def stall_next(self, seconds: float, times: int = 1) -> None:
        """The next `times` streams send `message_start`, then nothing for `seconds`, then carry on (a
        non-streaming request just answers `seconds` later)."""
        self._faults.add(_Fault("stall", seconds=seconds), times)

    def error_mid_stream_next(self, times: int = 1, after_deltas: int = 3) -> None:
        """The next `times` streams send `after_deltas` text deltas, then the documented `event: error` with an
        `overloaded_error`, and end (a non-streaming request gets HTTP 529 instead)."""
        self._faults.add(_Fault("error_mid_stream", after_deltas=after_deltas), times)

    def clear_cache(self) -> None:
        """Forget every cached prompt prefix."""
        with self._lock:
            self._cache.clear()

    # ---- accessors ----------------------------------------------------------------------------------------

    @property
    def status_counts(self) -> dict[int, int]:
        """HTTP status -> number of requests answered with it (200 includes streams that later errored)."""
        return dict(Counter(r.status for r in list(self.requests)))

    @property
    def disconnects(self) -> list[AnthropicRequest]:
        """Requests whose client left before the response was complete."""
        return [r for r in list(self.requests) if "client_disconnected" in r.events]

    @property
    def bodies(self) -> list[Any]:
        return [r.body for r in list(self.requests)]

    # ---- HTTP ---------------------------------------------------------------------------------------------

    def _error(self, rec: AnthropicRequest, err: AnthropicAPIError) -> web.Response:
        rec.status = err.status
        rec.events.append(f"error:{err.error_type}")
        body = {
            "type": "error",
            "error": {"type": err.error_type, "message": err.message},
            "request_id": rec.request_id,
        }
        return web.json_response(body, status=err.status, headers={"request-id": rec.request_id, **err.headers})

    async def _not_found(self, request: web.Request) -> web.Response:
        rec = self.record(request, await request.text())
        rec.request_id = _rand_id("req_")
        return self._error(rec, AnthropicAPIError(404, "Not Found"))

    def _check_headers(self, request: web.Request) -> None:
        key = request.headers.get("x-api-key")
        if not key:
            raise AnthropicAPIError(401, "x-api-key header is required")
        if key != self.api_key:
            raise AnthropicAPIError(401, "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if not version:
            raise AnthropicAPIError(400, "anthropic-version: header is required")
        if version not in API_VERSIONS:
            raise AnthropicAPIError(400, f"anthropic-version: invalid version '{version}'")
        betas = request.headers.get("anthropic-beta")
        if betas is not None:
            bad = [b.strip() for b in betas.split(",") if not _BETA_RE.match(b.strip())]
            if bad:
                raise AnthropicAPIError(
                    400,
                    f"Unexpected value(s) `{', '.join(bad)}` for the `anthropic-beta` header. Please consult "
                    "our documentation at docs.anthropic.com or try again without the header.",
                )
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise AnthropicAPIError(400, "Content-Type must be application/json")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        parsed = True
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body, parsed = raw.decode("utf-8", "replace"), False
        rec = self.record(request, body)
        rec.request_id = _rand_id("req_")
        try:
            self._check_headers(request)
            if not parsed or body is None:
                raise AnthropicAPIError(400, "The request body is not valid JSON.")
            if not isinstance(body, dict):
                raise AnthropicAPIError(400, "Input should be a valid dictionary")
            snapshot = self._validate(body)
        except AnthropicAPIError as err:
            return self._error(rec, err)

        rec.stream = bool(body.get("stream"))
        fault = self._faults.take()
        if fault is not None:
            rec.fault = fault.kind
            if fault.kind == "fail":
                headers = {}
                if fault.retry_after is not None:
                    headers["retry-after"] = f"{fault.retry_after:g}"
                if fault.status == 429:
                    headers["anthropic-ratelimit-requests-remaining"] = "0"
                return self._error(rec, AnthropicAPIError(fault.status, headers=headers))
            if fault.kind == "error_mid_stream" and not rec.stream:
                return self._error(rec, AnthropicAPIError(529))

        usage = self._usage_for(body, snapshot)
        text, stop_reason, stop_sequence = self._reply_for(body)
        tokens = split_tokens(text)
        if len(tokens) > body["max_tokens"]:
            tokens, stop_reason, stop_sequence = tokens[: body["max_tokens"]], "max_tokens", None
        usage["output_tokens"] = max(1, len(tokens))
        rec.usage = usage
        rec.stop_reason = stop_reason
        holder: list[web.StreamResponse] = []
        try:
            if rec.stream:
                return await self._stream(
                    request, rec, snapshot, tokens, stop_reason, stop_sequence, usage, fault, holder
                )
            return await self._json(request, rec, snapshot, tokens, stop_reason, stop_sequence, usage, fault)
        except (_ClientGone, ConnectionError):
            self._client_gone(rec)
            if holder:
                return holder[0]
            rec.status = 499  # nginx's "client closed request": no response was started
            return web.Response(status=499)
        except asyncio.CancelledError:
            self._client_gone(rec)
            raise

    def _client_gone(self, rec: AnthropicRequest) -> None:
        if "client_disconnected" not in rec.events:
            rec.disconnected_at = time.monotonic()
            rec.events.append("client_disconnected")
            rec.events.append(f"deltas_sent:{rec.deltas_sent}")

    def _message(
        self,
        rec: AnthropicRequest,
        snapshot: str,
        content: list,
        stop_reason: str | None,
        stop_sequence: str | None,
        usage: dict,
    ) -> dict:
        return {
            "id": rec.request_id.replace("req_", "msg_", 1),
            "type": "message",
            "role": "assistant",
            "model": snapshot,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    async def _json(self, request, rec, snapshot, tokens, stop_reason, stop_sequence, usage, fault) -> web.Response:
        delay = self.first_token_delay + (fault.seconds if fault and fault.kind == "stall" else 0.0)
        if self.tokens_per_second > 0:
            delay += max(0, len(tokens) - 1) / self.tokens_per_second
        await self._sleep(request, delay)
        text = "".join(tokens)
        rec.text_sent, rec.status = text, 200
        self.completed += 1
        rec.events.append("completed")
        body = self._message(rec, snapshot, [{"type": "text", "text": text}], stop_reason, stop_sequence, usage)
        return web.json_response(body, headers={"request-id": rec.request_id})

    async def _stream(
        self, request, rec, snapshot, tokens, stop_reason, stop_sequence, usage, fault, holder
    ) -> web.StreamResponse:
        await self._sleep(request, self.first_token_delay)
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": rec.request_id,
            },
        )
        rec.status = 200
        holder.append(resp)
        await resp.prepare(request)

        async def send(event: str, data: dict) -> None:
            if self._gone(request):
                raise _ClientGone()
            await resp.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

        start_usage = {**usage, "output_tokens": 1}
        await send(
            "message_start",
            {"type": "message_start", "message": self._message(rec, snapshot, [], None, None, start_usage)},
        )
        if fault and fault.kind == "stall":
            rec.events.append(f"stalled:{fault.seconds:g}")
            await self._sleep(request, fault.seconds)
        await send(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        await send("ping", {"type": "ping"})
        error_after = fault.after_deltas if fault and fault.kind == "error_mid_stream" else None
        interval = 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        for i, tok in enumerate(tokens):
            if error_after is not None and i >= error_after:
                break
            if interval and i:
                await self._sleep(request, interval)
            await send(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": tok}},
            )
            rec.deltas_sent += 1
            rec.text_sent += tok
        if error_after is not None:
            await send(
                "error",
                {
                    "type": "error",
                    "error": {"type": "overloaded_error", "message": "Overloaded"},
                    "request_id": rec.request_id,
                },
            )
            rec.events.append("error_event:overloaded_error")
            await resp.write_eof()
            return resp
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {k: v for k, v in usage.items() if k not in ("cache_creation", "service_tier")},
            },
        )
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        self.completed += 1
        rec.events.append("completed")
        return resp

    # ---- the model ----------------------------------------------------------------------------------------

    def _reply_for(self, body: dict) -> tuple[str, str, str | None]:
        text = self.reply(body)
        stop_reason, stop_sequence = "end_turn", None
        hits = [(text.find(s), s) for s in body.get("stop_sequences") or [] if s and s in text]
        if hits:
            at, stop_sequence = min(hits)
            text, stop_reason = text[:at], "stop_sequence"
        return text, stop_reason, stop_sequence

    def _segments(self, body: dict) -> list[_Segment]:
        """The prompt in cache order (tools, system, messages) as blocks with token counts and breakpoints."""

        def key(kind: str, block: Any) -> str:
            if isinstance(block, dict):
                block = {k: v for k, v in block.items() if k != "cache_control"}
            return kind + ":" + json.dumps(block, sort_keys=True, separators=(",", ":"))

        def tokens(block: Any) -> int:
            if isinstance(block, dict) and block.get("type") == "text":
                return estimate_tokens(block.get("text", ""))
            return estimate_tokens(json.dumps(block, sort_keys=True))

        segs: list[_Segment] = []
        for tool in body.get("tools") or []:
            segs.append(_Segment(key("tool", tool), tokens(tool), tool.get("cache_control")))
        system = body.get("system")
        if isinstance(system, str) and system:
            segs.append(_Segment(key("system", system), estimate_tokens(system), None))
        elif isinstance(system, list):
            for block in system:
                segs.append(_Segment(key("system", block), tokens(block), block.get("cache_control")))
        for msg in body["messages"]:
            content = msg["content"]
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for block in blocks:
                segs.append(_Segment(key(msg["role"], block), tokens(block), block.get("cache_control")))
        top = body.get("cache_control")
        if top and segs and segs[-1].cache_control is None:
            segs[-1].cache_control = top  # automatic caching: a breakpoint on the last cacheable block
        return segs

    def _usage_for(self, body: dict, snapshot: str) -> dict[str, Any]:
        segs = self._segments(body)
        cum, hashes, total = [], [], 0
        h = hashlib.sha256(snapshot.encode())
        for seg in segs:
            total += seg.tokens
            h.update(seg.key.encode())
            cum.append(total)
            hashes.append(h.copy().hexdigest())
        total += 3 * len(body["messages"])  # per-message framing overhead, never cached
        breakpoints = [i for i, s in enumerate(segs) if s.cache_control]
        now = time.monotonic()
        read = creation = 0
        created_ttl = "5m"
        with self._lock:
            read_at = -1
            for i in reversed(breakpoints):
                if cum[i] >= self.cache_min_tokens and self._cache.get(hashes[i], 0.0) > now:
                    read_at = i
                    break
            if read_at >= 0:
                read = cum[read_at]
            for i in breakpoints:
                if cum[i] < self.cache_min_tokens:
                    continue
                ttl = segs[i].cache_control.get("ttl", "5m")
                self._cache[hashes[i]] = now + (3600.0 if ttl == "1h" else 300.0)
                if i > read_at:
                    creation = cum[i] - read
                    created_ttl = ttl
        breakdown = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
        breakdown["ephemeral_1h_input_tokens" if created_ttl == "1h" else "ephemeral_5m_input_tokens"] = creation
        return {
            "input_tokens": total - read - creation,
            "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": read,
            "cache_creation": breakdown,
            "output_tokens": 0,
            "service_tier": "standard",
        }

    # ---- validation ---------------------------------------------------------------------------------------

    def _validate(self, body: dict) -> str:
        """Check the body like the API does; returns the snapshot id to report. Raises AnthropicAPIError."""

        def bad(msg: str) -> AnthropicAPIError:
            return AnthropicAPIError(400, msg)

        for name in body:
            if name not in ALLOWED_FIELDS:
                raise bad(f"{name}: Extra inputs are not permitted")
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                raise bad(f"{name}: Field required")
        model = body["model"]
        if not isinstance(model, str):
            raise bad("model: Input should be a valid string")
        max_tokens = body["max_tokens"]
        if not _is_int(max_tokens):
            raise bad("max_tokens: Input should be a valid integer")
        if max_tokens < 1:
            raise bad("max_tokens: Input should be greater than or equal to 1")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise bad("stream: Input should be a valid boolean")
        for name, lo, hi in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
            value = body.get(name)
            if value is None:
                continue
            if not _is_number(value):
                raise bad(f"{name}: Input should be a valid number")
            if value < lo:
                raise bad(f"{name}: Input should be greater than or equal to {lo:g}")
            if value > hi:
                raise bad(f"{name}: Input should be less than or equal to {hi:g}")
        if body.get("top_k") is not None and (not _is_int(body["top_k"]) or body["top_k"] < 0):
            raise bad("top_k: Input should be a non-negative integer")
        stops = body.get("stop_sequences")
        if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
            raise bad("stop_sequences: Input should be a valid list of strings")
        if stops and any(not s.strip() for s in stops):
            raise bad("stop_sequences: each stop sequence must contain non-whitespace")
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict) or set(metadata) - {"user_id"}:
                raise bad("metadata: only `user_id` is permitted")
        breakpoints = 1 if body.get("cache_control") else 0
        if body.get("cache_control") is not None:
            _check_cache_control(body["cache_control"], "cache_control")
        breakpoints += self._validate_system(body.get("system"))
        breakpoints += self._validate_messages(body["messages"])
        breakpoints += self._validate_tools(body)
        if breakpoints > 4:
            raise bad(f"A maximum of 4 blocks with cache_control may be provided. Found {breakpoints}.")
        self._validate_thinking(body)

        if model not in self.models:
            raise AnthropicAPIError(404, f"model: {model}")
        snapshot, max_out = KNOWN_MODELS.get(model, (model, 64_000))
        if max_tokens > max_out:
            raise bad(
                f"max_tokens: {max_tokens} > {max_out}, which is the maximum allowed number of output "
                f"tokens for {snapshot}"
            )
        if body["messages"][-1]["role"] == "assistant" and not model.startswith(_PREFILL_PREFIXES):
            raise bad(
                "This model does not support assistant message prefill. The conversation must end with a user message."
            )
        return snapshot

    @staticmethod
    def _validate_system(system: Any) -> int:
        if system is None or isinstance(system, str):
            return 0
        if not isinstance(system, list):
            raise AnthropicAPIError(400, "system: Input should be a valid string or a list of text blocks")
        marks = 0
        for i, block in enumerate(system):
            where = f"system.{i}"
            if not isinstance(block, dict) or block.get("type") != "text":
                raise AnthropicAPIError(400, f"{where}.type: Input should be 'text'")
            marks += _check_text_block(block, where)
        return marks

    @staticmethod
    def _validate_messages(messages: Any) -> int:
        if not isinstance(messages, list):
            raise AnthropicAPIError(400, "messages: Input should be a valid list")
        if not messages:
            raise AnthropicAPIError(400, "messages: at least one message is required")
        marks = 0
        for i, msg in enumerate(messages):
            where = f"messages.{i}"
            if not isinstance(msg, dict):
                raise AnthropicAPIError(400, f"{where}: Input should be a valid dictionary")
            for name in msg:
                if name not in ("role", "content"):
                    raise AnthropicAPIError(400, f"{where}.{name}: Extra inputs are not permitted")
            if msg.get("role") not in ("user", "assistant"):
                raise AnthropicAPIError(400, f"{where}.role: Input should be 'user' or 'assistant'")
            if "content" not in msg:
                raise AnthropicAPIError(400, f"{where}.content: Field required")
            content = msg["content"]
            if isinstance(content, str):
                if not content.strip() and not (msg["role"] == "assistant" and i == len(messages) - 1):
                    raise AnthropicAPIError(400, "messages: text content blocks must contain non-whitespace text")
                continue
            if not isinstance(content, list):
                raise AnthropicAPIError(400, f"{where}.content: Input should be a valid string or list")
            if not content:
                raise AnthropicAPIError(400, f"{where}.content: List should have at least 1 item after validation")
            for j, block in enumerate(content):
                bw = f"{where}.content.{j}"
                tag = block.get("type") if isinstance(block, dict) else None
                if tag not in _BLOCK_TYPES:
                    raise AnthropicAPIError(
                        400, f"{bw}: Input tag '{tag}' found using 'type' does not match any of the expected tags"
                    )
                if block["type"] == "text":
                    marks += _check_text_block(block, bw)
                elif block.get("cache_control") is not None:
                    _check_cache_control(block["cache_control"], f"{bw}.cache_control")
                    marks += 1
        return marks

    @staticmethod
    def _validate_tools(body: dict) -> int:
        tools = body.get("tools")
        if tools is None:
            if body.get("tool_choice") is not None:
                raise AnthropicAPIError(400, "tool_choice may only be specified while providing tools.")
            return 0
        if not isinstance(tools, list):
            raise AnthropicAPIError(400, "tools: Input should be a valid list")
        marks, names = 0, set()
        for i, tool in enumerate(tools):
            where = f"tools.{i}"
            if not isinstance(tool, dict):
                raise AnthropicAPIError(400, f"{where}: Input should be a valid dictionary")
            if tool.get("type") in (None, "custom"):
                name = tool.get("name")
                if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
                    raise AnthropicAPIError(
                        400, f"{where}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
                    )
                schema = tool.get("input_schema")
                if not isinstance(schema, dict) or schema.get("type") != "object":
                    raise AnthropicAPIError(
                        400, f"{where}.custom.input_schema: Input should be a JSON schema with type 'object'"
                    )
                if name in names:
                    raise AnthropicAPIError(400, "tools: Tool names must be unique.")
                names.add(name)
            if tool.get("cache_control") is not None:
                _check_cache_control(tool["cache_control"], f"{where}.cache_control")
                marks += 1
        choice = body.get("tool_choice")
        if choice is not None:
            if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
                raise AnthropicAPIError(400, "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
            if choice["type"] == "tool" and choice.get("name") not in names:
                raise AnthropicAPIError(400, "tool_choice.name: the named tool is not in `tools`")
        return marks

    @staticmethod
    def _validate_thinking(body: dict) -> None:
        thinking = body.get("thinking")
        if thinking is None:
            return
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled", "adaptive", "between_tools"):
            raise AnthropicAPIError(400, "thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if not _is_int(budget):
                raise AnthropicAPIError(400, "thinking.enabled.budget_tokens: Field required")
            if budget < 1024:
                raise AnthropicAPIError(
                    400, "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
                )
            if budget >= body["max_tokens"]:
                raise AnthropicAPIError(400, "`max_tokens` must be greater than `thinking.budget_tokens`.")
            temperature = body.get("temperature")
            if temperature is not None and temperature != 1:
                raise AnthropicAPIError(400, "`temperature` may only be set to 1 when thinking is enabled.")
        elif "budget_tokens" in thinking:
            raise AnthropicAPIError(400, f"thinking.{kind}.budget_tokens: Extra inputs are not permitted")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_cache_control(cc: Any, where: str) -> None:
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise AnthropicAPIError(400, f"{where}.type: Input should be 'ephemeral'")
    for name in cc:
        if name not in ("type", "ttl"):
            raise AnthropicAPIError(400, f"{where}.{name}: Extra inputs are not permitted")
    if "ttl" in cc and cc["ttl"] not in ("5m", "1h"):
        raise AnthropicAPIError(400, f"{where}.ttl: Input should be '5m' or '1h'")


def _check_text_block(block: dict, where: str) -> int:
    for name in block:
        if name not in ("type", "text", "cache_control", "citations"):
            raise AnthropicAPIError(400, f"{where}.{name}: Extra inputs are not permitted")
    if not isinstance(block.get("text"), str):
        raise AnthropicAPIError(400, f"{where}.text: Field required")
    if not block["text"].strip():
        raise AnthropicAPIError(400, "text content blocks must contain non-whitespace text")
    if block.get("cache_control") is not None:
        _check_cache_control(block["cache_control"], f"{where}.cache_control")
        return 1
    return 0
