"""Self-tests of the fakes' tool use and languages, driven by the real clients: the anthropic SDK (and Pipecat's
AnthropicLLMService) against FakeAnthropic's tool calls and tool-history validation, and deepgram-sdk (and Pipecat's
DeepgramSTTService) against FakeDeepgram's `language` handling."""

from __future__ import annotations

import asyncio
import json

import anthropic
import numpy as np
import pytest
import websockets
from anthropic import AsyncAnthropic
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.core import ApiError
from deepgram.core.events import EventType
from deepgram.listen.v1.types import ListenV1Results
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import InputAudioRawFrame, LLMContextFrame, TranscriptionFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.services.anthropic.llm import AnthropicLLMService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transcriptions.language import Language

from fakes.anthropic import TOOL_SYSTEM_PROMPT_TOKENS, FakeAnthropic, ToolUse, default_reply, tool_names, tool_results
from fakes.deepgram import NO_SUCH_COMBINATION, FakeDeepgram

KEY = "test-anthropic-key"
MODEL = "claude-haiku-4-5"
QUESTION = "What time is it in Paris?"
GET_TIME = {
    "name": "get_time",
    "description": "The current local time in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
GET_WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


# ---- Anthropic -------------------------------------------------------------------------------------------


def time_agent(body: dict):
    """Claude with one tool: ask for the time, then answer with what the tool said."""
    if tool_results(body):
        return f"It is {tool_results(body)[-1]} in Paris."
    return ToolUse("get_time", {"city": "Paris"}, text="Let me check.")


@pytest.fixture
def claude():
    with FakeAnthropic(reply=time_agent) as server:
        yield server


@pytest.fixture
async def client(claude):
    c = AsyncAnthropic(api_key=KEY, base_url=claude.http_url, max_retries=0)
    yield c
    await c.close()


def _ask(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": text}]


def _answered(tool_use_id: str, result="10:42", **extra) -> list[dict]:
    """The history after a `get_time` call `tool_use_id` and its result."""
    return [
        *_ask(),
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": tool_use_id, "name": "get_time", "input": {"city": "Paris"}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": result, **extra}]},
    ]


async def _settled(rec) -> None:
    """The fake notes a stream complete after its last write, which the client may have read first."""
    for _ in range(100):
        if "completed" in rec.events:
            return
        await asyncio.sleep(0.02)


async def test_tool_use_streams_as_the_api_does_and_the_sdk_assembles_it(claude, client):
    async with client.messages.stream(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=_ask()) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()

    raw = [e for e in events if e.type not in ("text", "input_json")]  # drop the SDK's derived events
    types = [e.type for e in raw]
    assert types[:2] == ["message_start", "content_block_start"]  # the helper drops `ping`
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    starts = [e for e in raw if e.type == "content_block_start"]
    assert [(s.index, s.content_block.type) for s in starts] == [(0, "text"), (1, "tool_use")]
    tool_start = starts[1].content_block
    assert tool_start.id.startswith("toolu_01") and len(tool_start.id) == 30
    assert tool_start.name == "get_time" and tool_start.input == {}
    json_deltas = [e.delta for e in raw if e.type == "content_block_delta" and e.index == 1]
    assert all(d.type == "input_json_delta" for d in json_deltas) and len(json_deltas) >= 3
    assert json_deltas[0].partial_json == ""
    assert json.loads("".join(d.partial_json for d in json_deltas)) == {"city": "Paris"}
    text_deltas = [e.delta.text for e in raw if e.type == "content_block_delta" and e.index == 0]
    assert "".join(text_deltas) == "Let me check."

    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Let me check."
    call = final.content[1]
    assert (call.id, call.name, call.input) == (tool_start.id, "get_time", {"city": "Paris"})
    # One output token per non-empty delta; the tool-use system prompt counts as input.
    assert final.usage.output_tokens == len(text_deltas) + len(json_deltas) - 1
    plain = await client.messages.create(model=MODEL, max_tokens=256, messages=_ask())
    assert final.usage.input_tokens >= plain.usage.input_tokens + TOOL_SYSTEM_PROMPT_TOKENS["auto"]

    rec = claude.requests[0]
    await _settled(rec)
    assert rec.stream and rec.stop_reason == "tool_use" and rec.text_sent == "Let me check."
    assert rec.tool_uses == [{"id": call.id, "name": "get_time", "input": {"city": "Paris"}}]
    assert rec.events == ["completed"] and rec.deltas_sent == len(text_deltas) + len(json_deltas)


async def test_tool_round_trip_with_create_stream_and_plain_create(claude, client):
    # create(stream=True), the call shape Pipecat makes: read the raw events as Pipecat does.
    stream = await client.messages.create(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=_ask(), stream=True)
    tool_block, partial, stop, types = None, "", None, []
    async for event in stream:
        types.append(event.type)
        if event.type == "content_block_start" and event.content_block.type == "tool_use":
            tool_block = event.content_block
        elif event.type == "content_block_delta" and hasattr(event.delta, "partial_json"):
            partial += event.delta.partial_json
        elif event.type == "message_delta":
            stop = event.delta.stop_reason
    assert types[:2] == ["message_start", "content_block_start"] and types[-1] == "message_stop"
    assert stop == "tool_use" and tool_block.name == "get_time" and json.loads(partial) == {"city": "Paris"}

    # The result goes back; the scripted model answers with it. Content as a list of text blocks works too.
    answer = await client.messages.create(
        model=MODEL, max_tokens=256, tools=[GET_TIME], messages=_answered(tool_block.id)
    )
    assert answer.stop_reason == "end_turn" and answer.content[0].text == "It is 10:42 in Paris."
    listed = _answered(tool_block.id, result=[{"type": "text", "text": "10:42"}, {"type": "text", "text": "CET"}])
    answer = await client.messages.create(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=listed)
    assert answer.content[0].text == "It is 10:42\nCET in Paris."

    # Not streamed: the whole call in one Message.
    message = await client.messages.create(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=_ask())
    assert message.stop_reason == "tool_use" and [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"city": "Paris"} and message.usage.output_tokens > 3
    assert claude.requests[-1].tool_uses[0]["id"] == message.content[1].id
    assert claude.status_counts == {200: 4}


def test_helpers_read_the_request():
    body = {"tools": [GET_TIME, GET_WEATHER], "messages": _answered("toolu_1", is_error=True)}
    assert tool_names(body) == ["get_time", "get_weather"] and tool_results(body) == ["10:42"]
    assert tool_names({"messages": _ask()}) == [] and tool_results({"messages": _ask()}) == []
    two = _answered("toolu_1", result=[{"type": "text", "text": "a"}, {"type": "image", "source": {}}])
    two[-1]["content"].append({"type": "tool_result", "tool_use_id": "toolu_2"})
    two.append({"role": "user", "content": [{"type": "text", "text": "and?"}]})  # merged with the turn before
    assert tool_results({"messages": two}) == []  # the last user message has no results
    assert tool_results({"messages": two[:-1]}) == ["a", ""]


async def test_pipecat_calls_the_function_and_sends_its_result_back(claude):
    llm = AnthropicLLMService(
        api_key=KEY,
        client=AsyncAnthropic(api_key=KEY, base_url=claude.http_url, max_retries=0),
        settings=AnthropicLLMService.Settings(model=MODEL, max_tokens=256),
    )
    calls = []

    async def get_time(params):
        calls.append(params.arguments)
        await params.result_callback({"time": "10:42"})

    llm.register_function("get_time", get_time)
    tools = ToolsSchema(
        standard_tools=[
            FunctionSchema(
                name="get_time",
                description="The local time.",
                properties={"city": {"type": "string"}},
                required=["city"],
            )
        ]
    )
    context = LLMContext(messages=_ask(), tools=tools)
    pair = LLMContextAggregatorPair(context)
    await run_test(
        Pipeline([llm, pair.assistant()]),
        frames_to_send=[LLMContextFrame(context), SleepFrame(1.5)],
        expected_down_frames=None,
    )
    assert calls == [{"city": "Paris"}]
    first, second = claude.requests
    assert first.status == second.status == 200 and first.tool_uses[0]["input"] == {"city": "Paris"}
    # Pipecat's second request passes the fake's history rules: the call, then its result right after.
    history = second.body["messages"]
    assert history[1]["content"][-1] == {"type": "tool_use", **first.tool_uses[0]}
    assert history[2]["content"][0]["tool_use_id"] == first.tool_uses[0]["id"]
    assert second.text_sent == 'It is {"time": "10:42"} in Paris.'


async def test_calls_are_made_only_as_a_model_could(claude, client):
    # A tool the request does not offer: the model answers in words (the call's text, else the default reply).
    claude.reply = lambda body: ToolUse("book_flight", {"to": "Paris"})
    msg = await client.messages.create(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=_ask())
    assert msg.stop_reason == "end_turn" and msg.content[0].text == default_reply({"messages": _ask()})
    assert "tool_not_offered:book_flight" in claude.requests[-1].events
    msg = await client.messages.create(model=MODEL, max_tokens=256, messages=_ask())  # no tools at all
    assert [b.type for b in msg.content] == ["text"]

    claude.reply = time_agent
    msg = await client.messages.create(
        model=MODEL, max_tokens=256, tools=[GET_TIME], tool_choice={"type": "none"}, messages=_ask()
    )
    assert msg.stop_reason == "end_turn" and msg.content[0].text == "Let me check."
    assert "tool_choice_none:get_time" in claude.requests[-1].events

    # A forcing tool_choice: the API prefills the turn, so no text comes before the call.
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
        msg = await client.messages.create(
            model=MODEL, max_tokens=256, tools=[GET_TIME], tool_choice=choice, messages=_ask()
        )
        assert [b.type for b in msg.content] == ["tool_use"] and msg.stop_reason == "tool_use"

    # Forced to call get_weather, the model does not call get_time; a script without a call is still answered.
    msg = await client.messages.create(
        model=MODEL,
        max_tokens=256,
        tools=[GET_TIME, GET_WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=_ask(),
    )
    assert msg.content[0].text == "Let me check." and "tool_choice_other_tool:get_time" in claude.requests[-1].events
    claude.reply = lambda body: "No tools today."
    msg = await client.messages.create(
        model=MODEL, max_tokens=256, tools=[GET_TIME], tool_choice={"type": "any"}, messages=_ask()
    )
    assert msg.content[0].text == "No tools today." and claude.requests[-1].events == ["tool_choice_unmet", "completed"]

    # Parallel calls, each its own block; disable_parallel_tool_use keeps the first.
    claude.reply = lambda body: ["Checking both.", ToolUse("get_time", {"city": "Paris"}), ToolUse("get_weather", {})]
    both = [GET_TIME, GET_WEATHER]
    async with client.messages.stream(model=MODEL, max_tokens=256, tools=both, messages=_ask()) as stream:
        msg = await stream.get_final_message()
    assert [(b.type, getattr(b, "name", None)) for b in msg.content] == [
        ("text", None),
        ("tool_use", "get_time"),
        ("tool_use", "get_weather"),
    ]
    assert msg.content[2].input == {} and msg.content[1].id != msg.content[2].id
    msg = await client.messages.create(
        model=MODEL,
        max_tokens=256,
        tools=both,
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        messages=_ask(),
    )
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.content[1].name == "get_time"

    # max_tokens can cut a call mid-input: stop_reason max_tokens, the input as far as it got.
    claude.reply = lambda body: ToolUse("get_time", {"city": "Paris", "format": "24h", "zone": "local"}, id="toolu_x1")
    async with client.messages.stream(model=MODEL, max_tokens=3, tools=[GET_TIME], messages=_ask()) as stream:
        msg = await stream.get_final_message()
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
    assert msg.content[0].id == "toolu_x1" and msg.content[0].input.get("city") == "Paris"
    assert msg.content[0].input != {"city": "Paris", "format": "24h", "zone": "local"}
    assert claude.requests[-1].tool_uses == []  # not a complete call


async def test_tool_definitions_and_history_are_validated_like_the_api(claude, client):
    def bad(**changes) -> dict:
        return {"model": MODEL, "max_tokens": 256, "tools": [GET_TIME], "messages": _ask(), **changes}

    use = {"type": "tool_use", "id": "toolu_A", "name": "get_time", "input": {"city": "Paris"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_A", "content": "10:42"}
    called = {"role": "assistant", "content": [use]}
    cases = {
        "tools.0.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'": bad(
            tools=[{**GET_TIME, "name": "get time"}]
        ),
        "tools.1.custom.name: String should match pattern": bad(tools=[GET_TIME, {**GET_WEATHER, "name": "w" * 129}]),
        "tools.0.custom.input_schema: Field required": bad(tools=[{"name": "get_time"}]),
        "tools.0.custom.input_schema.type: Input should be 'object'": bad(
            tools=[{**GET_TIME, "input_schema": {"type": "array"}}]
        ),
        "tools.0.custom.input_schema: JSON schema is invalid. It must match JSON Schema draft 2020-12.": bad(
            tools=[{**GET_TIME, "input_schema": {"type": "object", "properties": 5}}]
        ),
        "tools.0.custom.parameters: Extra inputs are not permitted": bad(tools=[{**GET_TIME, "parameters": {}}]),
        "tools: Tool names must be unique.": bad(tools=[GET_TIME, GET_TIME]),
        "tool_choice: Input tag 'sometimes' found using 'type'": bad(tool_choice={"type": "sometimes"}),
        "tool_choice.tool.name: Field required": bad(tool_choice={"type": "tool"}),
        "tool_choice.tool.name: 'get_weather' is not the name of a tool": bad(
            tool_choice={"type": "tool", "name": "get_weather"}
        ),
        "tool_choice.auto.disable_parallel_tool_use: Input should be a valid boolean": bad(
            tool_choice={"type": "auto", "disable_parallel_tool_use": "yes"}
        ),
        "tool_choice may only be specified while providing tools.": {
            k: v for k, v in bad(tool_choice={"type": "auto"}).items() if k != "tools"
        },
        "Thinking may not be enabled when tool_choice forces tool use.": bad(
            max_tokens=4096, tool_choice={"type": "any"}, thinking={"type": "enabled", "budget_tokens": 1024}
        ),
        # The history: every call answered at the start of the very next user turn, no stray results.
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_A. Each "
        "`tool_use` block must have a corresponding `tool_result` block in the next message.": bad(
            messages=[*_ask(), called, *_ask("Well?")]
        ),
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_A.": bad(
            messages=[*_ask(), called],  # a prefill ending in a call (Haiku 4.5 takes prefills)
        ),
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_B.": bad(
            messages=[
                *_ask(),
                {"role": "assistant", "content": [use, {**use, "id": "toolu_B"}]},
                {"role": "user", "content": [result]},
            ]
        ),
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_Z. Each "
        "`tool_result` block must have a corresponding `tool_use` block in the previous message.": bad(
            messages=[*_ask(), called, {"role": "user", "content": [{**result, "tool_use_id": "toolu_Z"}, result]}]
        ),
        "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_A.": bad(
            messages=[{"role": "user", "content": [result]}]
        ),
        "messages.2: Did not find 1 `tool_result` block(s) at the beginning of this message.": bad(
            messages=[*_ask(), called, {"role": "user", "content": [{"type": "text", "text": "Here:"}, result]}]
        ),
        "Requests which include `tool_use` or `tool_result` blocks must define tools.": {
            k: v
            for k, v in bad(messages=[*_ask(), called, {"role": "user", "content": [result]}]).items()
            if k != "tools"
        },
        "messages.1.content.0.tool_use.input: Field required": bad(
            messages=[*_ask(), {"role": "assistant", "content": [{k: v for k, v in use.items() if k != "input"}]}]
        ),
        "messages.1.content.0.tool_use.id: String should match pattern": bad(
            messages=[*_ask(), {"role": "assistant", "content": [{**use, "id": "call 1"}]}]
        ),
        "messages.2.content.0.tool_result.is_error: Input should be a valid boolean": bad(
            messages=[*_ask(), called, {"role": "user", "content": [{**result, "is_error": "no"}]}]
        ),
        "messages.3.content.0: `tool_use` ids must be unique": bad(
            messages=[
                *_ask(),
                called,
                {"role": "user", "content": [result]},
                called,
                {"role": "user", "content": [result]},
            ]
        ),
    }
    for needle, body in cases.items():
        with pytest.raises(anthropic.BadRequestError) as err:
            await client.messages.create(**body)
        assert err.value.status_code == 400, needle
        error = err.value.body["error"]
        assert error["type"] == "invalid_request_error" and error["message"].startswith(needle), (needle, error)
        assert err.value.request_id.startswith("req_")

    # What the API accepts: a result turn split over two user messages, a call after text in another
    # assistant message, an error result, results given as content blocks.
    claude.reply = lambda body: "Fine."
    fine = [
        [*_ask(), called, {"role": "user", "content": [result]}, *_ask("And in Rome?")],
        [
            *_ask(),
            {"role": "assistant", "content": "Let me check."},
            called,
            {"role": "user", "content": [{**result, "is_error": True, "content": [{"type": "text", "text": "down"}]}]},
        ],
    ]
    for messages in fine:
        msg = await client.messages.create(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=messages)
        assert msg.stop_reason == "end_turn"
    assert claude.status_counts == {400: len(cases), 200: len(fine)} and claude.completed == len(fine)


async def test_faults_apply_to_tool_replies(claude, client):
    claude.fail_next(529)
    with pytest.raises(anthropic.APIStatusError) as err:
        await client.messages.create(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=_ask(), stream=True)
    assert err.value.status_code == 529 and err.value.body["error"]["type"] == "overloaded_error"

    # The error event can cut a call mid-input (text and tool-input deltas count alike).
    claude.error_mid_stream_next(after_deltas=5)
    stream = await client.messages.create(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=_ask(), stream=True)
    seen = []
    with pytest.raises(anthropic.APIStatusError) as err:
        async for event in stream:
            seen.append(event.type if event.type != "content_block_delta" else event.delta.type)
    assert err.value.body["error"]["type"] == "overloaded_error"
    assert seen.count("text_delta") == 3 and seen.count("input_json_delta") == 2
    rec = claude.requests[-1]
    assert rec.fault == "error_mid_stream" and rec.tool_uses == [] and claude.completed == 0

    claude.stall_next(0.5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with client.messages.stream(model=MODEL, max_tokens=256, tools=[GET_TIME], messages=_ask()) as stream:
        msg = await stream.get_final_message()
    assert loop.time() - t0 >= 0.45 and msg.stop_reason == "tool_use" and msg.content[1].input == {"city": "Paris"}
    await _settled(claude.requests[-1])
    assert claude.requests[-1].events == ["stalled:0.5", "completed"]


# ---- Deepgram --------------------------------------------------------------------------------------------

DG_KEY = "test-deepgram-key"
DG_QUERY = dict(
    model="nova-3", encoding="linear16", sample_rate=16000, interim_results="false", punctuate="true", endpointing=300
)
SAYINGS = {"en": "What time is it?", "es": "¿Qué hora es?", "fr": "Quelle heure est-il ?"}


def dg_client(fake: FakeDeepgram) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(
        base=fake.http_url, production=fake.ws_url, agent=fake.ws_url, agent_rest=fake.http_url
    )
    return AsyncDeepgramClient(api_key=DG_KEY, environment=env)


def utterance() -> bytes:
    """0.3 s of silence, 0.8 s of a loud tone (speech to the fake's detector), 0.8 s of silence: 16 kHz PCM16."""
    t = np.arange(int(0.8 * 16000)) / 16000
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()
    return bytes(int(0.3 * 16000) * 2) + tone + bytes(int(0.8 * 16000) * 2)


async def transcribe(fake: FakeDeepgram, **query) -> list[ListenV1Results]:
    """One utterance through the SDK; the final Results with words."""
    got: list = []
    async with dg_client(fake).listen.v1.connect(**{**DG_QUERY, **query}) as connection:

        async def on_message(message):
            got.append(message)

        connection.on(EventType.MESSAGE, on_message)
        listener = asyncio.create_task(connection.start_listening())
        audio = utterance()
        for i in range(0, len(audio), 640):
            await connection.send_media(audio[i : i + 640])
        await connection.send_close_stream()
        await asyncio.wait_for(listener, 10)
    return [m for m in got if isinstance(m, ListenV1Results) and m.is_final and m.channel.alternatives[0].words]


async def handshake(url: str) -> tuple[int, dict, bytes]:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, additional_headers={"Authorization": f"Token {DG_KEY}"}, open_timeout=5):
            pass
    response = info.value.response
    return response.status_code, dict(response.headers), response.body


async def test_deepgram_records_the_language_and_scripts_per_language():
    with FakeDeepgram(transcripts=lambda language: SAYINGS[language.split("-")[0]]) as dg:
        spanish = await transcribe(dg, language="es")
        english = await transcribe(dg)  # no language: Deepgram's default, en
        french = await transcribe(dg, language="FR-ca")  # compared case-insensitively, recorded canonically
    assert [c.language for c in dg.connections] == ["es", "en", "fr-CA"]
    assert "language" not in dg.connections[1].query
    assert [r[0].channel.alternatives[0].transcript for r in (spanish, english, french)] == [
        SAYINGS["es"],
        SAYINGS["en"],
        SAYINGS["fr"],
    ]
    # Monolingual results carry no language fields (Deepgram documents them for language=multi only).
    alt = spanish[0].channel.alternatives[0]
    assert alt.languages is None and alt.languages_hinted is None and alt.words[0].language is None
    assert "languages" not in dg.connections[0].results[-1]["channel"]["alternatives"][0]


async def test_deepgram_refuses_a_language_the_model_does_not_serve():
    with FakeDeepgram(transcripts=lambda: "hello") as dg:
        with pytest.raises(ApiError) as info:
            async with dg_client(dg).listen.v1.connect(**DG_QUERY, language="xx-bogus"):
                pass
        assert info.value.status_code == 400
        assert not dg.connections and dg.requests[-1].status == 400
        assert dg.requests[-1].events == [f"rejected:{NO_SUCH_COMBINATION}"]

        base = f"{dg.ws_url}/v1/listen?encoding=linear16&sample_rate=16000"
        refused = [
            "model=nova-3&language=xx-bogus",
            "model=nova-3&language=en-CA",  # not a nova-3 English code
            "model=nova-3&language=ml",
            "model=nova-3-medical&language=fr",  # medical: English or multi
            "model=nova-2-phonecall&language=es",  # nova-2 variants: English only
            "model=nova-2&language=ta",
            "model=base&language=not_a_tag",
            "model=nova-3&language=multi&language_hint=xx",
        ]
        for query in refused:
            status, headers, body = await handshake(f"{base}&{query}")
            error = json.loads(body)
            assert status == 400, query
            assert error["err_code"] == "Bad Request" and error["request_id"] == headers["dg-request-id"], query
            assert error["err_msg"] == headers["dg-error"]
            if "language_hint" not in query:
                assert error["err_msg"] == NO_SUCH_COMBINATION, query

        accepted = {
            "nova-3": ["en", "en-US", "es", "es-419", "de", "ja", "zh-Hans", "hi", "multi"],
            "nova-3-general": ["pt-BR"],
            "nova-3-medical": ["en-GB", "multi"],
            "nova-2": ["es", "multi", "th-TH"],
            "nova-2-phonecall": ["en-US"],
            "base": ["es"],  # legacy models: any well-formed tag
        }
        for model, languages in accepted.items():
            for language in languages:
                async with dg_client(dg).listen.v1.connect(**{**DG_QUERY, "model": model}, language=language):
                    pass
                assert dg.connections[-1].language == language and dg.connections[-1].model == model


async def test_deepgram_multilingual_results_carry_the_documented_language_fields():
    with FakeDeepgram(transcripts=lambda language: f"Transcribed as {language}.") as dg:
        hinted = await transcribe(dg, language="multi", language_hint=["ES", "en-GB", "es"])
        unhinted = await transcribe(dg, language="multi")
        nova2 = await transcribe(dg, model="nova-2", language="multi")
    assert [c.language_hints for c in dg.connections] == [["es", "en"], [], []]
    alt = hinted[0].channel.alternatives[0]
    assert alt.transcript == "Transcribed as multi."
    assert alt.languages == ["es"] and alt.languages_hinted == ["es", "en"]
    assert {w.language for w in alt.words} == {"es"}
    alt = unhinted[0].channel.alternatives[0]
    assert alt.languages == ["en"] and alt.languages_hinted == []
    alt = nova2[0].channel.alternatives[0]  # nova-2 code-switching: no hinting
    assert alt.languages == ["en"] and alt.languages_hinted is None and alt.words[0].language == "en"


async def test_pipecat_deepgram_sends_its_language_setting():
    with FakeDeepgram(transcripts=lambda language: SAYINGS[language]) as dg:
        stt = DeepgramSTTService(
            api_key=DG_KEY,
            base_url=dg.ws_url,
            sample_rate=16000,
            settings=DeepgramSTTService.Settings(model="nova-3", language=Language.ES, endpointing=300),
        )
        audio = utterance()
        frames = [InputAudioRawFrame(audio[i : i + 640], 16000, 1) for i in range(0, len(audio), 640)]
        down, _ = await run_test(
            stt,
            frames_to_send=[*frames, SleepFrame(1.0)],
            pipeline_params=PipelineParams(audio_in_sample_rate=16000),
            start_timeout=10,
        )
    assert dg.connections[0].language == "es" and dg.connections[0].query["language"] == "es"
    assert [f.text for f in down if isinstance(f, TranscriptionFrame)] == [SAYINGS["es"]]
