"""The local LLM (llama-server, or any OpenAI-compatible server) through Pipecat's OpenAILLMService, with tool
calls a small model writes as text taken for what they are.

llama-server parses a tool call only in the model's own template format (Qwen's `<tool_call>{...}</tool_call>`).
The default offline model, Qwen2.5-Coder 1.5B, knows when a tool is wanted but writes the call its own way:
a JSON object in a code fence, bare, or in doubled braces, so the server returns it as text, the tool never
runs and the caller hears nothing useful. When the request offers tools, `LocalLLMService` holds back a reply
that opens like such a call (a fence, `{`, `<`) until it ends; if it is one call to an offered tool it becomes a
`tool_calls` delta (so Pipecat runs the tool as for any model), else the text goes on as it was. A reply that
opens with a word, which is every spoken reply, streams as before: nothing waits.

The request that follows a tool's result is sent without the tools, and with one more line of system prompt
(`AFTER_TOOL`): asked again with the tools, the 1.5B model calls another one (here: end_call, hanging up on
the caller) instead of saying the answer. So the local LLM makes one round of tool calls per turn; Claude
keeps its tools throughout.
"""

from __future__ import annotations

import json
import re
import uuid

from loguru import logger
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import (
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from pipecat.services.openai.llm import OpenAILLMService

_OPENERS = ("`", "{", "<")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_TAGS = re.compile(r"</?tool_call>|</?tools>")
AFTER_TOOL = "\n- The tool has answered: tell the caller its answer in a sentence"
MAX_HELD_CHARS = 2000  # a held reply longer than this is not a tool call: let it go


def parse_text_tool_call(text: str, tools: set[str]) -> tuple[str, dict] | None:
    """(name, arguments) when `text` is nothing but one call of an offered tool, written as JSON
    (`{"name": ..., "arguments": {...}}`, `parameters` for `arguments`), optionally in a code fence, in
    `<tool_call>` tags or in doubled braces; else None."""
    body = _TAGS.sub("", _FENCE.sub("", text.strip())).strip()
    if body.startswith("{{") and body.endswith("}}"):
        body = body[1:-1]
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in tools:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return str(call["name"]), arguments


def _tool_names(context) -> set[str]:
    tools = getattr(context, "tools", None)
    standard = getattr(tools, "standard_tools", None) or []
    return {t.name for t in standard if getattr(t, "name", None)}


class _TextToolCalls:
    """A chat-completions stream in which a reply that is a text-written tool call becomes a `tool_calls` delta."""

    def __init__(self, stream, tools: set[str], label: str):
        self._stream = stream
        self._tools = tools
        self._label = label

    def __aiter__(self):
        return self._chunks()

    async def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            await close()

    async def _chunks(self):
        held: list[ChatCompletionChunk] = []
        text = ""
        deciding, holding = True, False
        template: ChatCompletionChunk | None = None
        source = self._stream.__aiter__()
        try:
            async for chunk in source:
                delta = chunk.choices[0].delta if chunk.choices else None
                content = delta.content if delta is not None else None
                if not (deciding or holding) or not content:
                    if holding and content is None and chunk.choices:
                        held.append(chunk)  # a finish chunk of a held reply
                        continue
                    yield chunk
                    continue
                template = chunk
                text += content
                held.append(chunk)
                if deciding:
                    stripped = text.lstrip()
                    if not stripped:
                        continue
                    deciding = False
                    holding = stripped.startswith(_OPENERS)
                    if not holding:
                        for h in held:
                            yield h
                        held = []
                        continue
                if holding and len(text) > MAX_HELD_CHARS:
                    holding = False
                    for h in held:
                        yield h
                    held = []
            if holding or deciding:
                call = parse_text_tool_call(text, self._tools)
                if call is None or template is None:
                    for h in held:
                        yield h
                else:
                    name, arguments = call
                    logger.debug(f"{self._label}: the reply is a tool call written as text: {name}({arguments})")
                    yield _tool_call_chunk(template, name, arguments)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()


def _tool_call_chunk(template: ChatCompletionChunk, name: str, arguments: dict) -> ChatCompletionChunk:
    call = ChoiceDeltaToolCall(
        index=0,
        id=f"call_{uuid.uuid4().hex[:24]}",
        type="function",
        function=ChoiceDeltaToolCallFunction(name=name, arguments=json.dumps(arguments)),
    )
    return ChatCompletionChunk(
        id=template.id,
        created=template.created,
        model=template.model,
        object="chat.completion.chunk",
        choices=[Choice(index=0, delta=ChoiceDelta(role="assistant", tool_calls=[call]), finish_reason="tool_calls")],
    )


class LocalLLMService(OpenAILLMService):
    """Pipecat's OpenAI-compatible service, with text-written tool calls recovered and no tools offered right
    after a tool's result (see the module)."""

    def build_chat_completion_params(self, params_from_context) -> dict:
        params = super().build_chat_completion_params(params_from_context)
        messages = params.get("messages") or []
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
            params.pop("tools", None)
            params.pop("tool_choice", None)
            first = messages[0]
            if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
                params["messages"] = [{**first, "content": first["content"] + AFTER_TOOL}, *messages[1:]]
        return params

    async def get_chat_completions(self, context):
        stream = await super().get_chat_completions(context)
        tools = _tool_names(context)
        return _TextToolCalls(stream, tools, str(self)) if tools else stream
