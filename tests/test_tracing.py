"""Tracing (ATLAS_TRACING, monitoring/tracing.py): a session's spans, as a user's trace backend would show them.

The slow tests run real turns in an Atlas server started in this process (so an in-memory exporter can read the
spans back): the /ws door, Pipecat's pipeline, Silero, Whisper and Piper for real; Claude, Deepgram and ElevenLabs
are the fakes of fakes/, and the local LLM a small OpenAI-compatible stream here. Each session must leave one
trace: a `conversation` span (the session), a `turn` span under it, and under the turn the `stt`, `llm` and `tts`
spans of Atlas's own service classes (and a `tool` span under the `llm` span that asked for the tool). The same
spans must reach an OTLP/HTTP collector by the time the server has shut down.

The fast tests: with ATLAS_TRACING off the worker has no turn tracking and nothing is installed; tracing on without
an endpoint is refused; a failing tool's span says so.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from config.settings import Settings
from fakes.base import FakeServer
from monitoring import tracing
from tests.helpers import Speaker, TransportEnds, free_port

SERVICE = "atlas-voice-test"
VOICE = "21m00Tcm4TlvDq8EAJjs"
PLAYHT_VOICE = Settings.model_fields["playht_voice"].default
QUESTION = "What time is it in Paris?"
AGENTS = """
default = "concierge"

[agents.concierge]  # Whisper, Claude, Piper, a tool
prompt = "You're the concierge of the Grand Hotel."
tools = ["get_time"]

[agents.cloud]  # Deepgram, Claude, ElevenLabs
prompt = "You're the concierge of the Grand Hotel."
stt = "deepgram"
tts = "elevenlabs"

[agents.offline]  # Whisper, the local LLM (an OpenAI-compatible server), Piper
prompt = "You're the concierge of the Grand Hotel."
llm = "openai"

[agents.legacy]  # Whisper, Claude, PlayHT (our own TTS service)
prompt = "You're the concierge of the Grand Hotel."
tts = "playht"
"""


@pytest.fixture(scope="module")
def exporter():
    """The process's tracer provider (monitoring/tracing.py), with an in-memory exporter to read spans back; shut
    down at the end of the module (a process sets its provider once: later tests in it trace nothing)."""
    memory = InMemorySpanExporter()
    tracing.install_tracing(SERVICE, SimpleSpanProcessor(memory))
    yield memory
    tracing.shutdown_tracing()


# --- fast -------------------------------------------------------------------------------------------------


def _worker(engines, tmp_path, **settings):
    from bots.runtime import Runtime
    from bots.session import Caller, VoiceSession

    s = Settings(
        _env_file=None,
        cache_dir=tmp_path,
        deepgram_api_key="dg-key",
        anthropic_api_key="sk-ant-key",
        elevenlabs_api_key="el-key",
        llm_fallback="apology",
        **settings,
    )
    runtime = Runtime(settings=s)
    runtime.engines = engines
    return VoiceSession(runtime, Caller()).make_worker(TransportEnds())


def test_tracing_off_adds_no_tracer_and_no_turn_tracking(engines, tmp_path):
    from pipecat.observers.turn_tracking_observer import TurnTrackingObserver
    from pipecat.utils.tracing.turn_trace_observer import TurnTraceObserver

    assert Settings(_env_file=None).tracing is False
    assert tracing.start_tracing(Settings(_env_file=None)) is False  # nothing installed, nothing to shut down

    worker = _worker(engines, tmp_path)
    assert worker.turn_tracking_observer is None and worker.turn_trace_observer is None

    # On: Pipecat's turn tracking and its trace observer (which opens the conversation and turn spans) join it.
    worker = _worker(engines, tmp_path, tracing=True, otel_exporter_otlp_endpoint="http://127.0.0.1:9")
    assert isinstance(worker.turn_tracking_observer, TurnTrackingObserver)
    assert isinstance(worker.turn_trace_observer, TurnTraceObserver)


def test_tracing_on_needs_an_endpoint(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="ATLAS_TRACING=true needs OTEL_EXPORTER_OTLP_ENDPOINT"):
        Settings(_env_file=None, tracing=True).check_providers()
    on = Settings(_env_file=None, tracing=True, otel_exporter_otlp_endpoint="http://collector:4318/")
    on.check_providers()
    assert tracing.traces_url(on) == "http://collector:4318/v1/traces"
    # The exporter's own traces-only variable is enough, and wins (as the OpenTelemetry spec says).
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://api.honeycomb.io/v1/traces")
    Settings(_env_file=None, tracing=True).check_providers()
    assert tracing.traces_url(on) == "https://api.honeycomb.io/v1/traces"


async def test_a_tool_call_is_a_span_that_says_how_it_ended(exporter):
    import jsonschema

    from bots.tools import Tool, ToolCall, pipecat_handler

    async def fine(args: dict, call: ToolCall) -> str:
        return "done"

    async def broken(args: dict, call: ToolCall) -> str:
        raise RuntimeError("the booking system is down")

    call = ToolCall(session_id="s-1", agent="atlas", door="websocket")
    failures = []

    async def on_failure(name: str, reason: str) -> None:
        failures.append(name)

    exporter.clear()
    schema = {"type": "object", "properties": {}}
    for handler, name in ((fine, "trace_fine"), (broken, "trace_broken")):
        tool = Tool(name, "A test tool.", schema, handler, validator=jsonschema.Draft202012Validator(schema))
        results = []

        async def result_callback(result, properties=None, results=results):
            results.append(result)

        params = SimpleNamespace(arguments={}, tool_call_id=f"toolu_{name}", result_callback=result_callback)
        await pipecat_handler(tool, call, 5.0, on_failure)(params)
        assert results
    spans = {s.attributes["gen_ai.tool.name"]: s for s in exporter.get_finished_spans() if s.name == "tool"}
    assert spans["trace_fine"].attributes["atlas.tool.outcome"] == "ok"
    assert spans["trace_fine"].status.status_code == StatusCode.UNSET
    assert spans["trace_fine"].attributes["session.id"] == "s-1"
    assert spans["trace_fine"].attributes["gen_ai.tool.call.id"] == "toolu_trace_fine"
    assert spans["trace_broken"].attributes["atlas.tool.outcome"] == "failed"
    assert spans["trace_broken"].status.status_code == StatusCode.ERROR
    assert failures == ["trace_broken"]


# --- slow: real turns -------------------------------------------------------------------------------------


class Collector(FakeServer):
    """An OTLP/HTTP trace collector: `POST /v1/traces` (protobuf), keeping every span it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list = []
        self.resources: list[dict] = []
        self.app.router.add_post("/v1/traces", self._traces)

    async def _traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            self.resources.append({a.key: a.value.string_value for a in resource_spans.resource.attributes})
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")


class ChatCompletions(FakeServer):
    """A local LLM as Atlas reaches it (OpenAI's streamed chat completions): one short reply, with usage."""

    REPLY = ["It is ", "nine forty-one ", "in the evening ", "in Paris."]

    def __init__(self) -> None:
        super().__init__()
        self.app.router.add_post("/v1/chat/completions", self._completions)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(choices: list, **extra) -> None:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
            await response.write(f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n".encode())

        for piece in self.REPLY:
            await send([{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}])
        await send([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        await send([], usage={"prompt_tokens": 120, "completion_tokens": 12, "total_tokens": 132})
        await response.write(b"data: [DONE]\n\n")
        return response


class TracedServer:
    """An Atlas server in this process with ATLAS_TRACING on, its spans going to `collector` over OTLP/HTTP."""

    def __init__(self, tmp_path, exporter: InMemorySpanExporter):
        from fakes.anthropic import FakeAnthropic, ToolUse, tool_results
        from fakes.deepgram import FakeDeepgram
        from fakes.elevenlabs import FakeElevenLabs
        from fakes.playht import FakePlayHT

        self.exporter = exporter
        self.collector = Collector().start()
        self.llm = ChatCompletions().start()
        self.claude = FakeAnthropic().start()
        # The concierge checks the time with its tool, then says it; the other agents offer no tool.
        self.claude.reply = lambda body: (
            f"It is {tool_results(body)[-1]}"
            if tool_results(body)
            else ToolUse("get_time", {"city": "Paris"}, text="Let me check.")
            if body.get("tools")
            else "It is nine forty-one in the evening in Paris."
        )
        self.deepgram = FakeDeepgram(transcripts=lambda: QUESTION).start()
        self.elevenlabs = FakeElevenLabs(voices={VOICE}).start()
        self.playht = FakePlayHT().start()
        agents = tmp_path / "agents.toml"
        agents.write_text(AGENTS)
        self.settings = Settings(
            _env_file=None,
            tracing=True,
            otel_exporter_otlp_endpoint=self.collector.http_url,
            otel_service_name=SERVICE,
            anthropic_api_key="test-anthropic-key",
            anthropic_base_url=self.claude.http_url,
            deepgram_api_key="test-deepgram-key",
            deepgram_base_url=self.deepgram.ws_url,
            elevenlabs_api_key="test-elevenlabs-key",
            elevenlabs_base_url=self.elevenlabs.ws_url,
            elevenlabs_voice_id=VOICE,
            playht_api_key="test-playht-key",
            playht_user_id="test-playht-user",
            playht_base_url=self.playht.http_url,
            stt="whisper",
            llm="anthropic",
            tts="piper",
            llm_fallback="apology",
            llm_url=self.llm.http_url + "/v1",
            agent_config=agents,
            tool_modules=["tests.agent_tools"],
            sqlite_path=tmp_path / "atlas.sqlite3",
            outbox_path=tmp_path / "outbox.sqlite3",
            drain_secs=0,
            max_sessions_per_ip=0,
            session_starts_per_minute_per_ip=0,
            max_sessions_per_user=0,
            session_starts_per_minute_per_user=0,
        )
        self.question = Speaker(tmp_path).say("question", QUESTION)
        self.port = free_port()
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> TracedServer:
        from app.server import make_server

        self._server = server = make_server(self.settings, "127.0.0.1", self.port)
        self._thread = threading.Thread(target=server.run, name="traced-atlas", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 120
        while not server.runtime.ready.is_set():
            assert server.runtime.load_error is None, server.runtime.load_error
            assert time.monotonic() < deadline and self._thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Shut the server down (its tracer provider flushes to the collector); then the fakes."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(60)
            assert not self._thread.is_alive(), "the server did not shut down"
            self._server = None
        for fake in (self.claude, self.deepgram, self.elevenlabs, self.playht, self.llm, self.collector):
            fake.stop()

    async def talk(self, agent: str) -> str:
        """One session of one turn (the question, then the reply heard to its end) with `agent`; its id. The
        client names no conversation, so the session's id is the conversation's."""
        from app.talk import VoiceClient

        client = VoiceClient(f"ws://127.0.0.1:{self.port}/ws", agent=agent)
        client.conversation_id = ""
        await client.connect()
        try:
            await client.send_silence(0.3)
            await client.say(self.question)
            await client.wait_reply_done(timeout=60)
        finally:
            await client.stop()
        assert client.session_id is not None
        return client.session_id

    def trace(self, session_id: str, timeout: float = 10.0) -> Trace:
        """The session's trace, once its conversation span has ended (the worker's cleanup ends it)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.exporter.get_finished_spans()
            conversations = [
                s for s in spans if s.name == "conversation" and s.attributes.get("session.id") == session_id
            ]
            if conversations:
                return Trace(conversations[0], spans)
            assert time.monotonic() < deadline, f"no conversation span for session {session_id}"
            time.sleep(0.1)


class Trace:
    """One session's spans as a tree."""

    def __init__(self, conversation: ReadableSpan, spans):
        self.conversation = conversation
        trace_id = conversation.context.trace_id
        self.spans = [s for s in spans if s.context.trace_id == trace_id]
        self._children: dict[int, list[ReadableSpan]] = defaultdict(list)
        for s in self.spans:
            if s.parent is not None:
                self._children[s.parent.span_id].append(s)

    def children(self, span: ReadableSpan, name: str) -> list[ReadableSpan]:
        return [s for s in self._children[span.context.span_id] if s.name == name]

    def shape(self, span: ReadableSpan | None = None, depth: int = 0) -> str:
        """The tree as text, for failure messages."""
        span = span or self.conversation
        lines = ["  " * depth + span.name]
        for child in self._children[span.context.span_id]:
            lines.append(self.shape(child, depth + 1))
        return "\n".join(lines)


@pytest.fixture(scope="module")
def traced(tmp_path_factory, exporter):
    server = TracedServer(tmp_path_factory.mktemp("tracing"), exporter).start()
    yield server
    server.stop()


def _one(spans: list[ReadableSpan], what: str, tree: Trace) -> ReadableSpan:
    assert spans, f"no {what} span in\n{tree.shape()}"
    return spans[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("agent", "stt_model", "llm_model", "voice"),
    [
        ("concierge", "tiny.en", "claude-haiku-4-5", "en_US-joe-medium"),  # SharedWhisperSTTService ...
        ("cloud", "nova-3", "claude-haiku-4-5", VOICE),  # ResilientDeepgramSTTService, FallbackElevenLabsTTSService
        ("offline", "tiny.en", "local", "en_US-joe-medium"),  # LocalLLMService
        ("legacy", "tiny.en", "claude-haiku-4-5", PLAYHT_VOICE),  # PlayHTHttpTTSService
    ],
)
async def test_a_turn_is_a_trace_of_the_session_its_turn_and_each_stage(traced, agent, stt_model, llm_model, voice):
    session_id = await traced.talk(agent)
    tree = await asyncio.to_thread(traced.trace, session_id)

    conversation = tree.conversation
    assert conversation.attributes["conversation.id"] == session_id  # the client named no conversation
    assert conversation.attributes["atlas.agent"] == agent
    assert conversation.attributes["atlas.door"] == "websocket"
    assert conversation.resource.attributes["service.name"] == SERVICE

    turn = _one(tree.children(conversation, "turn"), "turn", tree)
    assert turn.attributes["turn.number"] == 1
    assert turn.attributes["conversation.id"] == session_id
    assert turn.attributes["turn.user_bot_latency_seconds"] > 0  # the voice-to-voice latency, as Pipecat saw it

    stt = _one(tree.children(turn, "stt"), "stt", tree)
    assert stt.attributes["gen_ai.request.model"] == stt_model
    assert "paris" in str(stt.attributes["transcript"]).lower()
    assert stt.attributes["metrics.ttfb"] >= 0

    llms = tree.children(turn, "llm")
    assert llms, f"no llm span in\n{tree.shape()}"
    assert {s.attributes["gen_ai.request.model"] for s in llms} == {llm_model}
    answered = [s for s in llms if "Paris" in str(s.attributes.get("output", ""))]
    assert answered, [s.attributes.get("output") for s in llms]
    assert answered[-1].attributes["metrics.ttfb"] >= 0
    assert answered[-1].attributes["gen_ai.usage.output_tokens"] > 0

    tts = tree.children(turn, "tts")
    assert tts, f"no tts span in\n{tree.shape()}"
    assert {s.attributes["voice_id"] for s in tts} == {voice}
    assert any("Paris" in str(s.attributes.get("text", "")) for s in tts)
    assert all(s.attributes["metrics.ttfb"] >= 0 for s in tts if "metrics.ttfb" in s.attributes)
    assert any("metrics.ttfb" in s.attributes for s in tts)

    tools = [t for llm in llms for t in tree.children(llm, "tool")]
    if agent == "concierge":  # the tool's span hangs from the llm span whose reply called it
        tool = _one(tools, "tool", tree)
        assert tool.attributes["gen_ai.tool.name"] == "get_time"
        assert tool.attributes["atlas.tool.outcome"] == "ok"
        assert tool.attributes["session.id"] == session_id
    else:
        assert not tools


@pytest.mark.slow
async def test_the_spans_reach_the_otlp_collector_by_shutdown(traced):
    session_id = await traced.talk("cloud")
    tree = await asyncio.to_thread(traced.trace, session_id)
    await asyncio.to_thread(traced.stop)  # the provider flushes its batch at shutdown

    received = {s.span_id: s for s in traced.collector.spans}
    for span in tree.spans:
        assert span.context.span_id.to_bytes(8, "big") in received, f"{span.name} never reached the collector"
    conversation = received[tree.conversation.context.span_id.to_bytes(8, "big")]
    assert {a.key: a.value.string_value for a in conversation.attributes}["session.id"] == session_id
    assert {r["service.name"] for r in traced.collector.resources} == {SERVICE}
