"""Claude through Pipecat's AnthropicLLMService, with the failure handling a live call needs.

Pipecat's service streams `POST /v1/messages`, applies prompt caching to the system prompt and
reports TTFB and token usage; what it leaves to the application, and this subclass adds:

- Bounded retries. The SDK's own retries are off (`max_retries=0`): they honour `retry-after`
  headers of up to a minute, far too long for someone waiting on a phone line. Here 429, 5xx, 529
  (overloaded), connection errors, a request timeout and a stream that sends no token within
  `first_token_timeout` are retried `retries` times with 0.25 s, 0.5 s ... backoff, never past
  `retry_budget` seconds after the reply was asked for.
- A fallback instead of silence. When the budget is spent (or the request is refused outright,
  e.g. a bad key), the reply comes from the local LLM if one is loaded, else a short spoken
  apology; a stream that breaks after Claude has started talking is finished with an apology. The
  fallback's tokens are fed through Pipecat's own stream handling as Anthropic events, so the
  aggregators, TTS and metrics see one ordinary reply. The client gets `LLM_UNAVAILABLE`.
- Cancellation that reaches the vendor. An interruption cancels the task running the request;
  the HTTP response is then closed explicitly, so the connection to Anthropic ends and it stops
  generating (and billing) tokens at once rather than whenever the stream is garbage-collected.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import anthropic
from anthropic import AsyncAnthropic
from anthropic.types.beta import BetaRawContentBlockDeltaEvent, BetaTextDelta
from loguru import logger
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.anthropic.llm import AnthropicLLMService

from compat.pipecat import AnthropicInternals
from vocabulary.errors import ErrorCode
from vocabulary.frames import coded_error

APOLOGY = "Sorry, I'm having trouble thinking right now. Could you say that again in a moment?"
APOLOGY_CONTINUED = " Sorry, I lost my train of thought there. Could you ask me again?"

RETRYABLE = (
    anthropic.RateLimitError,
    anthropic.InternalServerError,  # 5xx, including 529 overloaded
    anthropic.APIConnectionError,  # includes APITimeoutError
    asyncio.TimeoutError,  # no first token in time
)


def _retryable(error: BaseException) -> bool:
    if isinstance(error, RETRYABLE):
        return True
    status = getattr(error, "status_code", None)
    return isinstance(error, anthropic.APIStatusError) and (status in (408, 409, 429) or (status or 0) >= 500)


def _text_event(text: str) -> BetaRawContentBlockDeltaEvent:
    return BetaRawContentBlockDeltaEvent(
        type="content_block_delta", index=0, delta=BetaTextDelta(type="text_delta", text=text)
    )


class ResilientAnthropicLLMService(AnthropicInternals):
    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        system_instruction: str,
        max_tokens: int,
        retries: int = 2,
        retry_budget: float = 3.0,
        first_token_timeout: float = 8.0,
        fallback_url: str | None = None,
        fallback_model: str = "local",
        fallback_max_tokens: int = 150,
        fallback_headers: dict[str, str] | None = None,
        fallback_api_key: str = "none",
        fallback_system: str = "",
        on_retry=None,
        **kwargs,
    ):
        client = AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=anthropic.Timeout(first_token_timeout, connect=min(first_token_timeout, 3.0)),
        )
        super().__init__(
            api_key=api_key,
            client=client,
            settings=AnthropicLLMService.Settings(
                model=model,
                system_instruction=system_instruction,
                max_tokens=max_tokens,
                enable_prompt_caching=True,
            ),
            **kwargs,
        )
        self._retries = retries
        self._retry_budget = retry_budget
        self._first_token_timeout = first_token_timeout
        self._fallback_url = fallback_url
        self._fallback_model = fallback_model
        self._fallback_max_tokens = fallback_max_tokens
        self._fallback_headers = fallback_headers
        self._fallback_api_key = fallback_api_key
        self._fallback_system = fallback_system or system_instruction
        self._stream = None  # the response being read, closed on cancel
        self._on_retry = on_retry  # called with ("anthropic", reason) before each retry (/metrics)
        self._fallback_client = None  # AsyncOpenAI for the local LLM, made on first use

    async def process_context(self, context: LLMContext) -> None:
        try:
            await super().process_context(context)
        finally:
            await self._close_stream()

    async def cleanup(self):
        await super().cleanup()
        if self._fallback_client is not None:
            await self._fallback_client.close()
            self._fallback_client = None

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await stream.close()
            except Exception as e:  # closing is best effort; the socket goes with the task anyway
                logger.debug(f"{self}: closing the stream failed: {e}")

    async def create_message_stream(self, api_call, params):
        return self._resilient_events(api_call, params)

    def _backoff(self, attempt: int, error: BaseException) -> float:
        delay = 0.25 * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
        response = getattr(error, "response", None)
        if response is not None:
            try:
                delay = max(delay, float(response.headers.get("retry-after", 0)))
            except ValueError:
                pass
        return delay

    async def _resilient_events(self, api_call, params):
        deadline = time.monotonic() + self._retry_budget
        attempt, said, failure = 0, False, None
        while True:
            attempt += 1
            try:
                self._stream = await api_call(**params)
                events = self._stream.__aiter__()
                while True:
                    try:
                        if said:
                            event = await events.__anext__()
                        else:
                            event = await asyncio.wait_for(events.__anext__(), self._first_token_timeout)
                    except StopAsyncIteration:
                        return
                    if event.type == "content_block_delta":
                        said = True
                    yield event
            except Exception as e:  # noqa: BLE001 - every failure ends in a retry or the fallback
                failure = e
                await self._close_stream()
                delay = self._backoff(attempt, e)
                if said or not _retryable(e) or attempt > self._retries or time.monotonic() + delay > deadline:
                    break
                logger.warning(f"{self}: {_describe(e)}; retry {attempt} in {delay:.2f}s")
                if self._on_retry is not None:
                    status = getattr(e, "status_code", None)
                    self._on_retry("anthropic", str(status) if status else type(e).__name__)
                await asyncio.sleep(delay)

        logger.error(f"{self}: Claude failed ({_describe(failure)}) after {attempt} attempt(s); falling back")
        await self.push_error_frame(
            coded_error(
                ErrorCode.LLM_UNAVAILABLE,
                "the language model is unavailable right now; a fallback answered",
                f"Anthropic: {_describe(failure)}",
            )
        )
        if said:
            yield _text_event(APOLOGY_CONTINUED)
            return
        async for event in self._fallback_events(params):
            yield event

    async def _fallback_events(self, params):
        """The reply from the local LLM (OpenAI-compatible server), or the apology."""
        if self._fallback_url:
            from openai import AsyncOpenAI

            messages = [{"role": "system", "content": self._fallback_system}, *fallback_messages(params)]
            said = False
            try:
                if self._fallback_client is None:
                    self._fallback_client = AsyncOpenAI(
                        base_url=self._fallback_url,
                        api_key=self._fallback_api_key,
                        max_retries=0,
                        default_headers=self._fallback_headers,
                    )
                self._stream = await self._fallback_client.chat.completions.create(
                    model=self._fallback_model,
                    messages=messages,
                    stream=True,
                    max_tokens=self._fallback_max_tokens,
                )
                async for chunk in self._stream:
                    text = chunk.choices[0].delta.content if chunk.choices else None
                    if text:
                        said = True
                        yield _text_event(text)
                return
            except Exception as e:  # noqa: BLE001 - the apology is the last resort
                logger.error(f"{self}: local fallback LLM failed too: {e}")
                await self._close_stream()
                if said:
                    yield _text_event(APOLOGY_CONTINUED)
                    return
        yield _text_event(APOLOGY)


def _block_text(block) -> str:
    """A content block of Claude's conversation as plain text for a model without the tools."""
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "tool_use":
        return f"(I used the tool {block.get('name')} with {json.dumps(block.get('input', {}), default=str)[:500]})"
    if kind == "tool_result":
        content = block.get("content", "")
        if not isinstance(content, str):
            content = " ".join(b.get("text", "") for b in content or [] if isinstance(b, dict))
        failed = " (it failed)" if block.get("is_error") else ""
        return f"(The tool answered{failed}: {content[:1000]})"
    return ""


def fallback_messages(params) -> list[dict]:
    """Claude's request as chat messages for the local fallback: text only (tool calls and results become words:
    the fallback has no tools, and an OpenAI-style server refuses a tool result without its call), roles
    alternating (a tool result is a user turn in Claude's shape; adjacent turns of one role are joined)."""
    messages: list[dict] = []
    for m in params.get("messages", []):
        content = m.get("content")
        if not isinstance(content, str):
            content = " ".join(t for t in (_block_text(b) for b in content or []) if t)
        if not content.strip():
            continue
        if messages and messages[-1]["role"] == m["role"]:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": m["role"], "content": content})
    return messages


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no error"
    status = getattr(error, "status_code", None)
    if isinstance(error, asyncio.TimeoutError):
        return "no first token in time"
    return f"{type(error).__name__}" + (f" {status}" if status else "")
