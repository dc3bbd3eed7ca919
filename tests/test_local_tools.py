"""The local LLM's tool calls written as text (services/local/llm.py): recovered when they are one, left alone
when they are speech, with no wait for a reply that opens with a word."""

from __future__ import annotations

from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta

from services.local.llm import AFTER_TOOL, LocalLLMService, _TextToolCalls, parse_text_tool_call

TOOLS = {"get_time", "end_call"}


def chunk(content: str | None, finish: str | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="c1",
        created=0,
        model="local",
        object="chat.completion.chunk",
        choices=[Choice(index=0, delta=ChoiceDelta(content=content), finish_reason=finish)],
    )


class Stream:
    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.closed = False
        self.read = 0

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for p in self.pieces:
            self.read += 1
            yield chunk(p)
        yield chunk(None, "stop")

    async def close(self):
        self.closed = True


async def collect(pieces: list[str]) -> list[ChatCompletionChunk]:
    stream = _TextToolCalls(Stream(pieces), TOOLS, "test")
    return [c async for c in stream]


def test_parse_text_tool_calls_as_the_15b_model_writes_them():
    fenced = '```json\n{\n  "name": "get_time",\n  "arguments": {\n    "city": "Tokyo"\n  }\n}\n```'
    assert parse_text_tool_call(fenced, TOOLS) == ("get_time", {"city": "Tokyo"})
    assert parse_text_tool_call('{{"name": "end_call"}}', TOOLS) == ("end_call", {})
    assert parse_text_tool_call('<tool_call>{"name": "end_call", "arguments": {}}</tool_call>', TOOLS) == (
        "end_call",
        {},
    )
    assert parse_text_tool_call('{"name": "get_time", "parameters": "{\\"city\\": \\"Oslo\\"}"}', TOOLS) == (
        "get_time",
        {"city": "Oslo"},
    )
    for not_a_call in ('{"name": "rm_rf"}', "<tools></tools>", "Sure!", '{"name": "get_time", "arguments": 3}'):
        assert parse_text_tool_call(not_a_call, TOOLS) is None


async def test_a_text_tool_call_becomes_a_tool_calls_delta():
    out = await collect(["```json\n", '{"name": "get_time", ', '"arguments": {"city": "Tokyo"}}', "\n```"])
    calls = [c for c in out if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and not any(c.choices[0].delta.content for c in out)
    call = calls[0].choices[0].delta.tool_calls[0]
    assert call.function.name == "get_time" and call.function.arguments == '{"city": "Tokyo"}'


async def test_speech_streams_at_once_and_a_non_call_is_given_back_whole():
    out = await collect([" It", " is", " late."])
    assert "".join(c.choices[0].delta.content or "" for c in out) == " It is late."
    # A reply opening like a call but not one (a code sample): every piece comes back, in order.
    pieces = ["```python\n", "print('hi')\n", "```"]
    out = await collect(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in out) == "".join(pieces)


async def test_speech_is_not_held_back():
    """The first word goes on before the model has written the second: nothing waits for the end."""
    stream = Stream([" Hello", " there", "."])
    wrapped = _TextToolCalls(stream, TOOLS, "test").__aiter__()
    first = await wrapped.__anext__()
    assert first.choices[0].delta.content == " Hello" and stream.read == 1
    await wrapped.aclose()


def test_the_request_after_a_tool_result_offers_no_tools_and_asks_for_the_answer():
    service = LocalLLMService(
        api_key="none", base_url="http://127.0.0.1:9/v1", settings=LocalLLMService.Settings(model="local")
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time in Tokyo?"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_time"}}]},
        {"role": "tool", "tool_call_id": "c", "content": '"5:41 AM"'},
    ]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]

    def params(msgs):
        return service.build_chat_completion_params({"messages": msgs, "tools": tools, "tool_choice": "auto"})

    after = params(messages)
    assert "tools" not in after and "tool_choice" not in after
    assert after["messages"][0]["content"] == "Be brief." + AFTER_TOOL and messages[0]["content"] == "Be brief."
    before = params(messages[:2])
    assert before["tools"] == tools and before["messages"][0]["content"] == "Be brief."
