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
* tool use (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use): `tools` and
  `tool_choice` are validated as the API does, and so is the history: every `tool_use` id of an assistant turn
  must be answered by a `tool_result` at the start of the next user turn, and every `tool_result` must answer a
  `tool_use` of the turn just before (the API's own messages, e.g. "messages.1: `tool_use` ids were found
  without `tool_result` blocks immediately after: ..."); consecutive messages of one role count as one turn,
  as the API merges them;
* the SSE stream: `message_start`, `content_block_start`, `ping`, `content_block_delta` (`text_delta`, or
  `input_json_delta` for a tool call: the first `partial_json` is "", the rest concatenate to the input's JSON)
  ..., `content_block_stop`, one block after another, then `message_delta` (stop_reason `end_turn` /
  `tool_use` / `max_tokens` / `stop_sequence`, cumulative usage), `message_stop`; and the mid-stream `error`
  event;
* usage: deterministic token estimates (~4 characters per input token, plus the documented tool-use system
  prompt (346 tokens, 313 with a forcing `tool_choice`) when `tools` is not empty; one output token per
  streamed word-ish delta of text or tool-input JSON, so `max_tokens` truncates exactly, mid tool call
  included), and prompt caching: the first request with a cached prefix reports
  `cache_creation_input_tokens`, later requests with the same prefix (same model, within the TTL) report
  `cache_read_input_tokens`, and `input_tokens` counts only the uncached rest.

The model is the `reply(body)` hook: it returns the reply text, a `ToolUse` (a tool call, optionally after some
text), or a list mixing both (parallel tool calls). `tool_results(body)` and `tool_names(body)` help a script tell
the first request of a tool round trip from the second, e.g.
`lambda body: f"It is {tool_results(body)[-1]}." if tool_results(body) else ToolUse("get_time", {"city": "Paris"})`.
A scripted call is made as a model would make it: only to a tool the request offers, never with `tool_choice`
`none`, only to the named tool with `tool_choice` `tool` (a refused call is left out, noted in the request's
events as `tool_not_offered:<name>` / `tool_choice_none:<name>` / `tool_choice_other_tool:<name>`, and if
nothing is left to say the fake says `default_reply`); with a forcing `tool_choice` (`any` / `tool`) no text
precedes the first call (a script that makes no call is still answered, noted as `tool_choice_unmet`);
`disable_parallel_tool_use` keeps only the first call.

Scripting (thread-safe, callable from the test thread while the fake serves): `fail_next`, `fail_always`,
`stall_next`, `error_mid_stream_next`, `clear_faults`; latency via `first_token_delay` and `tokens_per_second`.
Faults are queued in the order scripted; each valid request (past auth and validation) takes the next one.
They apply to tool calls alike (`error_mid_stream_next(after_deltas=n)` counts text and tool-input deltas).
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
# The live API's pattern (its 400 names it); the tool-use guide still says {1,64}, older models' limit.
_TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_TOOL_USE_ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
_CUSTOM_TOOL_FIELDS = frozenset(
    {
        "type",
        "name",
        "description",
        "input_schema",
        "cache_control",
        "strict",
        "input_examples",
        "defer_loading",
        "allowed_callers",
        "eager_input_streaming",
    }
)
_TOOL_CHOICE_FIELDS = {
    "auto": {"type", "disable_parallel_tool_use"},
    "any": {"type", "disable_parallel_tool_use"},
    "tool": {"type", "name", "disable_parallel_tool_use"},
    "none": {"type"},
}
_TOOL_USE_FIELDS = frozenset({"type", "id", "name", "input", "cache_control", "caller", "toolset_name"})
_TOOL_RESULT_FIELDS = frozenset({"type", "tool_use_id", "content", "is_error", "cache_control", "toolset_name"})
_TOOL_RESULT_CONTENT_TYPES = ("text", "image", "search_result", "document", "tool_reference", "browser_state")
# The system prompt the API adds when `tools` is given (Claude 4.x / Sonnet 3.7 figures, the docs' pricing table).
TOOL_SYSTEM_PROMPT_TOKENS = {"auto": 346, "none": 346, "any": 313, "tool": 313}
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


@dataclass
class ToolUse:
    """A scripted tool call, for `reply(body)` to return (alone, or in a list with text and other calls).

    `text`, if any, is said first, in its own text block (as Claude says "Let me check." before a call); `id`
    defaults to a fresh `toolu_01...` id. The call is streamed as the API streams one: `content_block_start`
    with `{"type": "tool_use", "id", "name", "input": {}}`, then `input_json_delta`s whose `partial_json`
    concatenate to the JSON of `input`, and the message stops with `stop_reason` "tool_use".
    """

    name: str
    input: dict = field(default_factory=dict)
    text: str = ""
    id: str | None = None


Reply = str | ToolUse | list[str | ToolUse]


def tool_names(body: dict) -> list[str]:
    """The names of the tools the request offers (`tools`), in order."""
    tools = body.get("tools") if isinstance(body, dict) else None
    return [t["name"] for t in tools or [] if isinstance(t, dict) and isinstance(t.get("name"), str)]


def _result_text(block: dict) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    texts = [b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]
    return "\n".join(texts)


def tool_results(body: dict) -> list[str]:
    """The text of each `tool_result` block in the last user message, in order ([] when it has none): a string
    `content` as is, a list of content blocks as its text blocks joined by newlines."""
    for msg in reversed((body.get("messages") if isinstance(body, dict) else None) or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if not isinstance(content, list):
                return []
            return [_result_text(b) for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    return []


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
    deltas_sent: int = 0  # content deltas (text and tool input) written before the stream ended or the client left
    text_sent: str = ""  # the reply text actually written
    stop_reason: str | None = None
    tool_uses: list[dict] = field(default_factory=list)  # tool calls sent in full: {"id", "name", "input"}
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
class _Block:
    """One content block of the reply: its stream pieces (text tokens, or tool-input JSON chunks after a "")."""

    kind: str  # "text" | "tool_use"
    pieces: list[str]
    id: str = ""
    name: str = ""
    input: dict | None = None
    complete: bool = True  # False: cut by max_tokens

    @property
    def tokens(self) -> int:
        return sum(1 for p in self.pieces if p)

    def start(self) -> dict:
        if self.kind == "text":
            return {"type": "text", "text": ""}
        return {"type": "tool_use", "id": self.id, "name": self.name, "input": {}}

    def delta(self, piece: str) -> dict:
        if self.kind == "text":
            return {"type": "text_delta", "text": piece}
        return {"type": "input_json_delta", "partial_json": piece}

    def final(self) -> dict:
        """The block as a complete `Message` carries it."""
        if self.kind == "text":
            return {"type": "text", "text": "".join(self.pieces)}
        return {"type": "tool_use", "id": self.id, "name": self.name, "input": self.parsed_input()}

    def parsed_input(self) -> dict:
        if self.complete:
            return dict(self.input or {})
        try:  # cut mid-JSON: what the SDK's own partial parse makes of it
            from jiter import from_json

            value = from_json("".join(self.pieces).encode(), partial_mode=True)
            return value if isinstance(value, dict) else {}
        except Exception:  # noqa: BLE001 - jiter comes with the SDK, which the fake does not need
            return {}


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
        reply: Callable[[dict], Reply] | None = None,
        first_token_delay: float = 0.0,
        tokens_per_second: float = 0,
        cache_min_tokens: int = 0,
    ) -> None:
        """
        Args:
            api_key: the only `x-api-key` accepted.
            models: model ids accepted (others get 404 `not_found_error`); default: the well-known current and
                legacy ids plus every id the installed SDK lists. Aliases report their snapshot id back.
            reply: request body -> reply text, a `ToolUse`, or a list of both; default `default_reply` (quotes the
                last user message). See the module docstring for how tool calls are made.
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
        self.app.router.add_get("/v1/models/{model_id}", self._model)
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
        if request.method == "POST" and ctype.split(";")[0].strip().lower() != "application/json":
            raise AnthropicAPIError(400, "Content-Type must be application/json")

    async def _model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{model_id}`: the model's object (`type`, `id`, `display_name`, `created_at`), 404
        `not_found_error` for a model this key cannot use; the same auth and version checks as messages."""
        rec = self.record(request, None)
        rec.request_id = _rand_id("req_")
        model = request.match_info["model_id"]
        try:
            self._check_headers(request)
            if model not in self.models:
                raise AnthropicAPIError(404, f"model: {model}")
        except AnthropicAPIError as err:
            return self._error(rec, err)
        rec.status = 200
        snapshot = KNOWN_MODELS.get(model, (model, 0))[0]
        body = {"type": "model", "id": snapshot, "display_name": model, "created_at": "2025-10-01T00:00:00Z"}
        return web.json_response(body, headers={"request-id": rec.request_id})

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
        blocks, stop_reason, stop_sequence = self._reply_for(body, rec)
        usage["output_tokens"] = max(1, sum(b.tokens for b in blocks))
        rec.usage = usage
        rec.stop_reason = stop_reason
        holder: list[web.StreamResponse] = []
        try:
            if rec.stream:
                return await self._stream(
                    request, rec, snapshot, blocks, stop_reason, stop_sequence, usage, fault, holder
                )
            return await self._json(request, rec, snapshot, blocks, stop_reason, stop_sequence, usage, fault)
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

    @staticmethod
    def _record_tool_use(rec: AnthropicRequest, block: _Block) -> None:
        if block.kind == "tool_use" and block.complete:
            rec.tool_uses.append({"id": block.id, "name": block.name, "input": dict(block.input or {})})

    async def _json(self, request, rec, snapshot, blocks, stop_reason, stop_sequence, usage, fault) -> web.Response:
        delay = self.first_token_delay + (fault.seconds if fault and fault.kind == "stall" else 0.0)
        if self.tokens_per_second > 0:
            delay += max(0, sum(len(b.pieces) for b in blocks) - 1) / self.tokens_per_second
        await self._sleep(request, delay)
        rec.text_sent = "".join("".join(b.pieces) for b in blocks if b.kind == "text")
        rec.status = 200
        for block in blocks:
            self._record_tool_use(rec, block)
        self.completed += 1
        rec.events.append("completed")
        content = [b.final() for b in blocks]
        body = self._message(rec, snapshot, content, stop_reason, stop_sequence, usage)
        return web.json_response(body, headers={"request-id": rec.request_id})

    async def _stream(
        self, request, rec, snapshot, blocks, stop_reason, stop_sequence, usage, fault, holder
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

        async def error_event() -> web.StreamResponse:
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

        start_usage = {**usage, "output_tokens": 1}
        await send(
            "message_start",
            {"type": "message_start", "message": self._message(rec, snapshot, [], None, None, start_usage)},
        )
        if fault and fault.kind == "stall":
            rec.events.append(f"stalled:{fault.seconds:g}")
            await self._sleep(request, fault.seconds)
        error_after = fault.after_deltas if fault and fault.kind == "error_mid_stream" else None
        interval = 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        for index, block in enumerate(blocks):
            await send(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": block.start()}
            )
            if index == 0:
                await send("ping", {"type": "ping"})
            for piece in block.pieces:
                if error_after is not None and rec.deltas_sent >= error_after:
                    return await error_event()
                if interval and rec.deltas_sent:
                    await self._sleep(request, interval)
                await send(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": block.delta(piece)},
                )
                rec.deltas_sent += 1
                if block.kind == "text":
                    rec.text_sent += piece
            if error_after is not None and index == len(blocks) - 1:
                return await error_event()  # a reply shorter than `after_deltas`: the error ends it anyway
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
            self._record_tool_use(rec, block)
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

    def _script(self, body: dict, rec: AnthropicRequest) -> list[str | ToolUse]:
        """The `reply` hook's answer as a flat list of texts and tool calls, each call made only as a model
        could make it for this request (see the module docstring)."""
        raw = self.reply(body)
        items: list[str | ToolUse] = []
        for item in raw if isinstance(raw, list) else [raw]:
            if isinstance(item, ToolUse):
                if item.text:
                    items.append(item.text)
                items.append(item)
            elif isinstance(item, str):
                items.append(item)
            else:
                raise TypeError(f"reply() gave {type(item).__name__}; expected str, ToolUse or a list of them")
        offered = set(tool_names(body))
        choice = body.get("tool_choice") or {"type": "auto"}
        kept: list[str | ToolUse] = []
        for item in items:
            if isinstance(item, ToolUse):
                refused = None
                if choice["type"] == "none":
                    refused = "tool_choice_none"
                elif item.name not in offered:
                    refused = "tool_not_offered"
                elif choice["type"] == "tool" and item.name != choice["name"]:
                    refused = "tool_choice_other_tool"
                elif choice.get("disable_parallel_tool_use") and any(isinstance(k, ToolUse) for k in kept):
                    refused = "parallel_tool_use_disabled"
                if refused:
                    rec.events.append(f"{refused}:{item.name}")
                    continue
            kept.append(item)
        calls = [i for i, item in enumerate(kept) if isinstance(item, ToolUse)]
        if choice["type"] in ("any", "tool"):
            if calls:
                kept = kept[calls[0] :]  # the API prefills the turn to force the call: no text before it
            else:
                rec.events.append("tool_choice_unmet")  # the script answered in words where the API forces a call
        if len(kept) < len(items) and not calls and not any(kept):
            kept = [default_reply(body)]  # every call refused and nothing said: the model answers in words
        return kept

    def _reply_for(self, body: dict, rec: AnthropicRequest) -> tuple[list[_Block], str, str | None]:
        blocks: list[_Block] = []
        stop_reason, stop_sequence = "end_turn", None
        for item in self._script(body, rec):
            if isinstance(item, ToolUse):
                if not isinstance(item.input, dict):
                    raise TypeError(f"ToolUse({item.name!r}).input must be a dict")
                text = json.dumps(item.input, ensure_ascii=False)
                block_id = item.id or "toolu_01" + "".join(secrets.choice(_B62) for _ in range(22))
                blocks.append(_Block("tool_use", ["", *split_tokens(text)], block_id, item.name, item.input))
                stop_reason = "tool_use"
                continue
            hits = [(item.find(s), s) for s in body.get("stop_sequences") or [] if s and s in item]
            if hits:
                at, stop_sequence = min(hits)
                item, stop_reason = item[:at], "stop_sequence"
            if item:
                if blocks and blocks[-1].kind == "text":
                    blocks[-1].pieces = split_tokens("".join(blocks[-1].pieces) + item)
                else:
                    blocks.append(_Block("text", split_tokens(item)))
            if stop_reason == "stop_sequence":
                break
        if not blocks:
            blocks.append(_Block("text", []))
        budget = body["max_tokens"]
        for i, block in enumerate(blocks):
            if block.tokens <= budget:
                budget -= block.tokens
                continue
            kept, used = [], 0
            for piece in block.pieces:
                if piece and used == budget:
                    break
                used += bool(piece)
                kept.append(piece)
            block.pieces, block.complete = kept, False
            blocks = blocks[: i + 1] if used else blocks[:i]
            stop_reason, stop_sequence = "max_tokens", None
            break
        return blocks or [_Block("text", [])], stop_reason, stop_sequence

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
        if body.get("tools"):  # the tool-use system prompt the API adds
            total += TOOL_SYSTEM_PROMPT_TOKENS[(body.get("tool_choice") or {"type": "auto"})["type"]]
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
        _check_tool_pairing(body)
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
                    continue
                if block["type"] == "tool_use":
                    _check_tool_use_block(block, bw)
                elif block["type"] == "tool_result":
                    _check_tool_result_block(block, bw)
                if block.get("cache_control") is not None:
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
                _check_custom_tool(tool, f"{where}.custom")
            name = tool.get("name")
            if isinstance(name, str):
                if name in names:
                    raise AnthropicAPIError(400, "tools: Tool names must be unique.")
                names.add(name)
            if tool.get("cache_control") is not None:
                _check_cache_control(tool["cache_control"], f"{where}.cache_control")
                marks += 1
        choice = body.get("tool_choice")
        if choice is not None:
            if not isinstance(choice, dict):
                raise AnthropicAPIError(400, "tool_choice: Input should be a valid dictionary")
            kind = choice.get("type")
            if kind not in _TOOL_CHOICE_FIELDS:
                raise AnthropicAPIError(
                    400,
                    f"tool_choice: Input tag '{kind}' found using 'type' does not match any of the expected tags: "
                    "'auto', 'any', 'tool', 'none'",
                )
            for name in choice:
                if name not in _TOOL_CHOICE_FIELDS[kind]:
                    raise AnthropicAPIError(400, f"tool_choice.{kind}.{name}: Extra inputs are not permitted")
            if "disable_parallel_tool_use" in choice and not isinstance(choice["disable_parallel_tool_use"], bool):
                raise AnthropicAPIError(
                    400, f"tool_choice.{kind}.disable_parallel_tool_use: Input should be a valid boolean"
                )
            if kind == "tool":
                if not isinstance(choice.get("name"), str):
                    raise AnthropicAPIError(400, "tool_choice.tool.name: Field required")
                if choice["name"] not in names:
                    raise AnthropicAPIError(
                        400, f"tool_choice.tool.name: '{choice['name']}' is not the name of a tool in `tools`"
                    )
            thinking = body.get("thinking")
            if (
                kind in ("any", "tool")
                and isinstance(thinking, dict)
                and thinking.get("type") in ("enabled", "adaptive")
            ):
                raise AnthropicAPIError(400, "Thinking may not be enabled when tool_choice forces tool use.")
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


def _check_custom_tool(tool: dict, where: str) -> None:
    for name in tool:
        if name not in _CUSTOM_TOOL_FIELDS:
            raise AnthropicAPIError(400, f"{where}.{name}: Extra inputs are not permitted")
    name = tool.get("name")
    if name is None:
        raise AnthropicAPIError(400, f"{where}.name: Field required")
    if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
        raise AnthropicAPIError(400, f"{where}.name: String should match pattern '{_TOOL_NAME_RE.pattern}'")
    if "description" in tool and not isinstance(tool["description"], str):
        raise AnthropicAPIError(400, f"{where}.description: Input should be a valid string")
    if "input_schema" not in tool:
        raise AnthropicAPIError(400, f"{where}.input_schema: Field required")
    schema = tool["input_schema"]
    if not isinstance(schema, dict):
        raise AnthropicAPIError(400, f"{where}.input_schema: Input should be a valid dictionary")
    if schema.get("type") != "object":
        raise AnthropicAPIError(400, f"{where}.input_schema.type: Input should be 'object'")
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # pragma: no cover - jsonschema is in the lock file; without it only the shape is checked
        return
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError:
        raise AnthropicAPIError(
            400, f"{where}.input_schema: JSON schema is invalid. It must match JSON Schema draft 2020-12."
        ) from None


def _check_tool_use_block(block: dict, where: str) -> None:
    where += ".tool_use"
    for name in block:
        if name not in _TOOL_USE_FIELDS:
            raise AnthropicAPIError(400, f"{where}.{name}: Extra inputs are not permitted")
    for name in ("id", "name", "input"):
        if name not in block:
            raise AnthropicAPIError(400, f"{where}.{name}: Field required")
    if not isinstance(block["id"], str) or not _TOOL_USE_ID_RE.match(block["id"]):
        raise AnthropicAPIError(400, f"{where}.id: String should match pattern '{_TOOL_USE_ID_RE.pattern}'")
    if not isinstance(block["name"], str) or not block["name"]:
        raise AnthropicAPIError(400, f"{where}.name: String should have at least 1 character")
    if not isinstance(block["input"], dict):
        raise AnthropicAPIError(400, f"{where}.input: Input should be a valid dictionary")


def _check_tool_result_block(block: dict, where: str) -> None:
    where += ".tool_result"
    for name in block:
        if name not in _TOOL_RESULT_FIELDS:
            raise AnthropicAPIError(400, f"{where}.{name}: Extra inputs are not permitted")
    if "tool_use_id" not in block:
        raise AnthropicAPIError(400, f"{where}.tool_use_id: Field required")
    if not isinstance(block["tool_use_id"], str) or not _TOOL_USE_ID_RE.match(block["tool_use_id"]):
        raise AnthropicAPIError(400, f"{where}.tool_use_id: String should match pattern '{_TOOL_USE_ID_RE.pattern}'")
    if "is_error" in block and not isinstance(block["is_error"], bool):
        raise AnthropicAPIError(400, f"{where}.is_error: Input should be a valid boolean")
    content = block.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise AnthropicAPIError(400, f"{where}.content: Input should be a valid string or list")
    for k, item in enumerate(content):
        tag = item.get("type") if isinstance(item, dict) else None
        if tag not in _TOOL_RESULT_CONTENT_TYPES:
            raise AnthropicAPIError(
                400,
                f"{where}.content.{k}: Input tag '{tag}' found using 'type' does not match any of the expected tags",
            )
        if tag == "text":
            _check_text_block(item, f"{where}.content.{k}.text")


def _check_tool_pairing(body: dict) -> None:
    """The API's rules for a history with tool calls, over turns (consecutive messages of one role, as the API
    merges them): each assistant turn's `tool_use` ids are all answered by `tool_result` blocks at the very start
    of the next user turn, and a `tool_result` answers a `tool_use` of the assistant turn just before it."""
    messages = body["messages"]
    turns: list[tuple[str, list[tuple[int, int, dict]]]] = []  # role, [(message index, block index, block)]
    for i, msg in enumerate(messages):
        content = msg["content"]
        blocks = [(i, j, b) for j, b in enumerate(content)] if isinstance(content, list) else [(i, 0, {"type": "text"})]
        if turns and turns[-1][0] == msg["role"]:
            turns[-1][1].extend(blocks)
        else:
            turns.append((msg["role"], blocks))
    has_tool_blocks = any(b["type"] in ("tool_use", "tool_result") for _, blocks in turns for _, _, b in blocks)
    if has_tool_blocks and not body.get("tools"):
        raise AnthropicAPIError(400, "Requests which include `tool_use` or `tool_result` blocks must define tools.")
    seen_ids: set[str] = set()
    for k, (role, blocks) in enumerate(turns):
        if role == "user":
            before = turns[k - 1][1] if k else []
            called = {b["id"] for _, _, b in before if b["type"] == "tool_use"}
            for i, j, b in blocks:
                if b["type"] == "tool_use":
                    raise AnthropicAPIError(
                        400, f"messages.{i}.content.{j}: `tool_use` blocks may only be sent by the assistant"
                    )
                if b["type"] == "tool_result" and b["tool_use_id"] not in called:
                    raise AnthropicAPIError(
                        400,
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{b['tool_use_id']}. Each `tool_result` block must have a corresponding `tool_use` block "
                        "in the previous message.",
                    )
            continue
        uses = [(i, j, b) for i, j, b in blocks if b["type"] == "tool_use"]
        for i, j, b in blocks:
            if b["type"] == "tool_result":
                raise AnthropicAPIError(
                    400, f"messages.{i}.content.{j}: `tool_result` blocks may only be sent by the user"
                )
        for i, j, b in uses:
            if b["id"] in seen_ids:
                raise AnthropicAPIError(400, f"messages.{i}.content.{j}: `tool_use` ids must be unique")
            seen_ids.add(b["id"])
        if not uses:
            continue
        after = turns[k + 1][1] if k + 1 < len(turns) else []
        answered = {b["tool_use_id"] for _, _, b in after if b["type"] == "tool_result"}
        missing = [(i, b["id"]) for i, _, b in uses if b["id"] not in answered]
        if missing:
            raise AnthropicAPIError(
                400,
                f"messages.{missing[0][0]}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(m for _, m in missing)}. Each `tool_use` block must have a corresponding "
                "`tool_result` block in the next message.",
            )
        leading = 0
        for _, _, b in after:
            if b["type"] != "tool_result":
                break
            leading += 1
        if leading < len(uses):
            raise AnthropicAPIError(
                400,
                f"messages.{after[0][0]}: Did not find {len(uses)} `tool_result` block(s) at the beginning of this "
                "message. Messages following `tool_use` blocks must begin with a matching number of `tool_result` "
                "blocks.",
            )
