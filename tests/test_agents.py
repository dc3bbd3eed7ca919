"""Agents from a file, with a greeting, tools, transcripts, webhooks and a language: whole calls over real sockets.

One Atlas server (a subprocess, as in production) runs the agent file below with the tools of
tests/agent_tools.py (ATLAS_TOOL_MODULES). Claude is the fake speaking the Messages API's tool use as the real
one streams it; speech is Whisper and Piper; the phone door talks to the Twilio fake; `session.ended` webhooks go
to a receiver in the test that checks their signatures.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import httpx
import pytest
from aiohttp import web

from fakes.anthropic import ToolUse, default_reply, tool_names, tool_results
from fakes.twilio import FakeTwilioREST, TwilioCaller, new_sid, twilio_signature
from storage.webhooks import verify
from tests.conftest import VOICE, cloud_env, reset_vendors
from tests.helpers import REPO, connected_client, free_port, running_server

pytestmark = pytest.mark.timeout(900)

TOKEN = "test-twilio-auth-token"
WEBHOOK_SECRET = "whsec-test-0123456789"
GREETING = "Grand Hotel, good evening. How can I help you?"
TRANSFER_TO = "+15557654321"
AGENTS = f"""
default = "concierge"

[agents.concierge]
prompt = "You're the concierge of the Grand Hotel. Keep answers to two sentences."
greeting = "{GREETING}"
tools = ["get_time", "broken_lookup", "slow_search", "end_call", "transfer_call"]
store_transcripts = true
transfer_number = "{TRANSFER_TO}"

[agents.recepcion]
prompt = "Eres el recepcionista del Gran Hotel."
language = "es"
stt = "deepgram"
tts = "elevenlabs"
"""


class Receiver:
    """A webhook receiver: answers 500 to the first `fail_first` deliveries, then 200; keeps every delivery."""

    def __init__(self, fail_first: int = 1):
        self.fail_first = fail_first
        self.deliveries: list[tuple[dict, bytes]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/atlas"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.deliveries.append((dict(request.headers), body))
        if len(self.deliveries) <= self.fail_first:
            return web.Response(status=500, text="receiver hiccup")
        return web.Response(status=204)

    def accepted(self, session_id: str) -> list[dict]:
        """The events for this session that this receiver answered 2xx, with a valid signature."""
        out = []
        for i, (headers, body) in enumerate(self.deliveries):
            event = json.loads(body)
            if event["data"]["session"]["id"] != session_id or i < self.fail_first:
                continue
            assert verify(WEBHOOK_SECRET, headers["Atlas-Signature"], body), headers
            out.append(event)
        return out


@pytest.fixture(scope="module")
def receiver():
    rec = Receiver(fail_first=1)
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/hooks/atlas", rec.handle)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", rec.port).start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield rec
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def twilio_rest():
    with FakeTwilioREST(auth_token=TOKEN) as fake:
        yield fake


@pytest.fixture(scope="module")
def agents_server(vendors, llm_record, twilio_rest, receiver, artifacts, tmp_path_factory):
    config = tmp_path_factory.mktemp("agents") / "agents.toml"
    config.write_text(AGENTS)
    env = {
        **cloud_env(vendors, llm_record, "piper"),
        "ATLAS_STT": "whisper",
        "ATLAS_LLM": "anthropic",
        "ATLAS_AGENT_CONFIG": str(config),
        "ATLAS_TOOL_MODULES": "tests.agent_tools",
        "ATLAS_WEBHOOK_URL": receiver.url,
        "ATLAS_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ATLAS_OUTBOX_MAX_BACKOFF_SECS": "1",
        "TWILIO_ACCOUNT_SID": twilio_rest.account_sid,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "TWILIO_API_BASE_URL": twilio_rest.http_url,
        "ATLAS_TWILIO_AGENT": "concierge",
    }
    log = artifacts / "server_agents.log"
    with running_server(env, log) as base:
        yield base, log.with_suffix(".sqlite3")


@pytest.fixture(autouse=True)
def fresh(vendors):
    reset_vendors(vendors)


def time_then_goodbye(body: dict):
    """Claude's fake, scripted from the conversation alone (a preemptive request sees the same one): the first
    question gets a get_time call, then its answer; the next question gets end_call."""
    results = tool_results(body)
    if results:
        return f"{json.loads(results[-1])} Anything else?"
    questions = [
        m
        for m in body["messages"]
        if m["role"] == "user"
        and not (isinstance(m["content"], list) and any(b.get("type") == "tool_result" for b in m["content"]))
    ]
    if len(questions) == 1:
        return ToolUse("get_time", {"city": "Paris"}, text="Let me check.")
    return ToolUse("end_call", {}, text="Goodbye, and enjoy your stay.")


def said(events: list[dict]) -> str:
    return " ".join(e["text"] for e in events if e.get("type") == "bot_transcript")


def turn_rows(db, session_id: str, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            rows = [
                dict(r)
                for r in conn.execute(
                    "select * from voice_turns where session_id = ? order by turn_index", [session_id]
                )
            ]
            ended = conn.execute("select ended_at from voice_sessions where id = ?", [session_id]).fetchone()
        if (ended and ended[0] and rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


async def wait_accepted(receiver: Receiver, session_id: str, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = receiver.accepted(session_id)
        if events:
            return events
        await asyncio.sleep(0.2)
    raise AssertionError(f"no webhook accepted for {session_id}: {len(receiver.deliveries)} deliveries")


async def test_ws_agent_greets_calls_a_tool_says_its_result_and_hangs_up(agents_server, vendors, speech, receiver):
    base, db = agents_server
    claude = vendors["anthropic"]
    claude.reply = time_then_goodbye
    n = len(claude.requests)
    ws = base.replace("http://", "ws://") + "/ws"
    from app.talk import VoiceClient

    client = VoiceClient(ws, agent="concierge")
    await client.connect()
    # The agent speaks first: its greeting, before the caller has said anything.
    await client.wait_for(lambda e: e.get("type") == "bot_transcript", timeout=30)
    await client.send_silence(3.0)
    assert said(client.events).startswith("Grand Hotel, good evening.")
    assert client.reply_audio, "the greeting was not heard"

    await client.say(speech["dinner"])
    await client.wait_reply_done(timeout=60)
    answer = said(client.events)
    assert "It is 9:41 PM in Paris." in answer, answer  # the tool's result, spoken

    requests = [r for r in claude.requests[n:] if r.status == 200]
    first = requests[0].body  # (a preemptive request that wanted the tool was withdrawn; the turn's own ran it)
    second = next(r.body for r in requests if tool_results(r.body))
    assert tool_names(first) == ["get_time", "broken_lookup", "slow_search", "end_call", "transfer_call"]
    assert "concierge of the Grand Hotel" in json.dumps(first["system"])
    assert GREETING in json.dumps(first["system"])  # the prompt says what was said first
    assert [json.loads(r) for r in tool_results(second)] == ["It is 9:41 PM in Paris."]  # Pipecat sends JSON

    # The caller says goodbye; the agent says its own and hangs up: session_end `agent_ended`, then the close.
    await client.say(speech["puppy"])
    end = await client.wait_for(lambda e: e.get("type") == "session_end", timeout=60)
    assert end["reason"] == "agent_ended"
    assert "Goodbye, and enjoy your stay." in said(client.events)
    await client.close()

    # Transcripts are stored (the agent opts in), and the webhook carries them, signed, after one retry.
    rows = turn_rows(db, client.session_id)
    assert any("9:41" in (r["bot_text"] or "") for r in rows), rows
    assert all(r["user_text"] for r in rows)
    events = await wait_accepted(receiver, client.session_id)
    event = events[0]
    assert event["type"] == "session.ended" and event["data"]["session"]["end_reason"] == "agent_ended"
    assert event["data"]["session"]["agent"] == "concierge"
    assert any("9:41" in t["bot"] for t in event["data"]["transcript"])
    ids = {
        json.loads(b)["id"]
        for h, b in receiver.deliveries
        if json.loads(b)["data"]["session"]["id"] == client.session_id
    }
    assert len(ids) == 1  # a retry is the same event


async def test_phone_agent_greets_calls_a_tool_and_hangs_up_through_twilio(agents_server, vendors, twilio_rest, speech):
    base, _db = agents_server
    claude = vendors["anthropic"]
    claude.reply = time_then_goodbye
    call_sid = new_sid("CA")
    caller = await TwilioCaller.dial(
        base, TOKEN, account_sid=twilio_rest.account_sid, call_sid=call_sid, from_="+15550001111", to="+15550002222"
    )
    await caller.connect()
    # The greeting arrives before the caller speaks (ATLAS_TWILIO_AGENT picks the concierge).
    await caller.wait_for(lambda m: m.get("event") == "media", timeout=30)
    await caller.send_silence(3.0)

    n = len(claude.requests)
    await caller.say(speech["dinner"])
    await caller.wait_reply_done(timeout=60)
    assert any(r.text_sent.startswith("It is 9:41 PM in Paris.") for r in claude.requests[n:])

    await caller.say(speech["puppy"])
    await caller.wait_closed(timeout=60)
    hangups = [h for h in twilio_rest.hangups if h.call_sid == call_sid]
    assert len(hangups) == 1 and hangups[0].auth_ok and hangups[0].status == "completed"


async def test_phone_agent_transfers_the_call_with_dial(agents_server, vendors, twilio_rest, speech):
    base, db = agents_server
    claude = vendors["anthropic"]
    claude.reply = lambda body: ToolUse("transfer_call", {}, text="I'm putting you through to the front desk.")
    call_sid = new_sid("CA")
    caller = await TwilioCaller.dial(base, TOKEN, account_sid=twilio_rest.account_sid, call_sid=call_sid)
    await caller.connect()
    await caller.send_silence(3.5)
    await caller.say(speech["dinner"])
    await caller.wait_closed(timeout=60)
    updates = [u for u in twilio_rest.updates if u.call_sid == call_sid]
    assert len(updates) == 1, updates  # the redirect, and no hang-up after it (that would end the transfer)
    twiml = ET.fromstring(updates[0].params["Twiml"])
    assert twiml.tag == "Response" and twiml.find("Dial").text == TRANSFER_TO
    assert updates[0].auth_ok and updates[0].response_status == 200


async def test_a_tool_that_raises_or_hangs_gets_an_apology_and_tool_failed_and_the_call_goes_on(
    agents_server, vendors, speech
):
    base, _db = agents_server
    claude = vendors["anthropic"]
    plan = {"tool": "broken_lookup"}

    def reply(body):
        last = body["messages"][-1]["content"]
        said_something = isinstance(last, str) or any(b.get("type") == "text" and b["text"].strip() for b in last)
        if tool_results(body) and not said_something:  # a request that follows a tool's result, and nothing else
            return "This should never be asked for."
        if plan["tool"]:
            return ToolUse(plan["tool"], {})
        return default_reply(body)

    claude.reply = reply
    n = len(claude.requests)
    ws = base.replace("http://", "ws://") + "/ws"
    client = await connected_client(ws)
    await client.send_silence(3.0)  # the greeting
    for tool in ("broken_lookup", "slow_search"):
        plan["tool"] = tool
        mark = len(client.events)
        await client.say(speech["dinner"])
        error = await client.wait_for(
            lambda e, tool=tool: e.get("type") == "error" and e["code"] == "TOOL_FAILED" and tool in e["message"],
            timeout=30,
        )
        assert "booking system" not in error["message"]  # no internals to the client
        await client.wait_reply_done(timeout=30)
        assert "Sorry, I couldn't get that done just now." in said(client.events[mark:])
    # No second request after a failed tool: the apology is the answer. The conversation goes on.
    assert all("This should never" not in r.text_sent for r in claude.requests[n:])
    plan["tool"] = None
    mark = len(client.events)
    await client.say(speech["puppy"])
    await client.wait_reply_done(timeout=60)
    assert "I heard you say" in said(client.events[mark:])
    await client.stop()


async def test_claude_fallback_answers_a_conversation_that_holds_tool_calls(agents_server, vendors, speech, llm_record):
    from tests.helpers import read_records

    base, _db = agents_server
    claude = vendors["anthropic"]
    claude.reply = time_then_goodbye
    ws = base.replace("http://", "ws://") + "/ws"
    client = await connected_client(ws)
    await client.send_silence(3.0)
    await client.say(speech["dinner"])
    await client.wait_reply_done(timeout=60)
    assert "9:41" in said(client.events)
    # Claude goes down: the local LLM answers from the same conversation, tool call and result as words.
    claude.fail_always(529)
    before = len(read_records(llm_record))
    mark = len(client.events)
    await client.say(speech["puppy"])
    await client.wait_reply_done(timeout=120)
    await client.stop()
    assert "LLM_UNAVAILABLE" in [e["code"] for e in client.events if e.get("type") == "error"]
    assert said(client.events[mark:]).strip()
    local = read_records(llm_record)[before:]
    assert local, "the local fallback was not asked"
    text = json.dumps(local[-1]["messages"])
    assert "get_time" in text and "9:41 PM" in text
    roles = [m["role"] for m in local[-1]["messages"]]
    assert roles[0] == "system" and all(a != b for a, b in zip(roles[1:], roles[2:], strict=False))  # alternating


async def test_unknown_agents_are_refused_on_every_door(agents_server, vendors):
    import websockets

    base, _db = agents_server
    async with websockets.connect(base.replace("http://", "ws://") + "/ws") as ws:
        await ws.send(json.dumps({"type": "session_start", "userId": "u", "conversationId": "c", "agent": "nope"}))
        refused = json.loads(await ws.recv())
        assert refused["code"] == "UNKNOWN_AGENT" and "nope" in refused["message"]
        # The connection waits for a valid start: the Spanish agent (Deepgram, ElevenLabs) is on the list.
        await ws.send(json.dumps({"type": "session_start", "userId": "u", "conversationId": "c", "agent": "recepcion"}))
        started = json.loads(await ws.recv())
        assert started["type"] == "session_started"
        await ws.send(json.dumps({"type": "session_stop"}))
    url = base + "/twilio/voice?agent=nope"  # a number's webhook naming an agent the server does not have
    form = {"CallSid": new_sid("CA"), "AccountSid": "AC" + "0" * 32, "From": "+15550001111", "To": "+15550002222"}
    r = httpx.post(url, data=form, headers={"X-Twilio-Signature": twilio_signature(TOKEN, url, form)})
    assert r.status_code == 400 and r.json()["code"] == "UNKNOWN_AGENT"


async def test_an_agents_language_reaches_deepgram_elevenlabs_and_the_prompt(agents_server, vendors, speech):
    base, _db = agents_server
    dg, claude, eleven = vendors["deepgram"], vendors["anthropic"], vendors["elevenlabs"]
    n_dg, n_claude, n_eleven = len(dg.connections), len(claude.requests), len(eleven.connections)
    from app.talk import VoiceClient

    client = VoiceClient(base.replace("http://", "ws://") + "/ws", agent="recepcion")
    await client.connect()
    await client.send_silence(0.3)
    await client.say(speech["dinner"])
    await client.wait_reply_done(timeout=60)
    await client.stop()
    assert dg.connections[n_dg].language == "es"
    assert "Spanish" in json.dumps(claude.requests[n_claude].body["system"])
    el = eleven.connections[n_eleven]
    assert el.query["model_id"] == "eleven_flash_v2_5" and el.query.get("language_code") == "es"
    assert el.path == f"/v1/text-to-speech/{VOICE}/multi-stream-input"


def _serve(config_text: str, tmp_path, **env) -> subprocess.CompletedProcess:
    path = tmp_path / "agents.toml"
    path.write_text(config_text)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        cwd=REPO,
        env={**__import__("os").environ, "ATLAS_AGENT_CONFIG": str(path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_a_bad_agent_file_naming_the_line_and_key(tmp_path):
    bad = '[agents.front]\nprompt = "Hi"\ngreting = "Hello"\n'
    r = _serve(bad, tmp_path)
    assert r.returncode == 2
    assert "line 3" in r.stderr and "agents.front.greting" in r.stderr and "unknown key" in r.stderr, r.stderr
    r = _serve('[agents.front]\ntools = ["get_weather"]\n', tmp_path)
    assert r.returncode == 2 and "no tool named 'get_weather'" in r.stderr, r.stderr
    r = _serve('[agents.front]\nlanguage = "es"\n', tmp_path, ATLAS_STT="whisper", ATLAS_TTS="piper")
    assert r.returncode == 2 and "English only" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def local_agent_server(llm_record, artifacts, tmp_path_factory):
    """The offline engines, the local LLM (Qwen2.5-Coder 1.5B on llama-server, through the recording proxy) and an
    agent with tools."""
    config = tmp_path_factory.mktemp("local-agents") / "agents.toml"
    config.write_text('[agents.clock]\nprompt = "You\'re a helpful clock."\ntools = ["get_time", "end_call"]\n')
    env = {
        "ATLAS_LLM_URL": llm_record.with_suffix(".url").read_text(),
        "ATLAS_LLM_MODEL_NAME": "local",
        "ATLAS_LLM_TEMPERATURE": "0",
        "ATLAS_AGENT_CONFIG": str(config),
        "ATLAS_TOOL_MODULES": "tests.agent_tools",
        "ATLAS_LOG_FORMAT": "json",  # and its log, one JSON object a line (checked below)
    }
    with running_server(env, artifacts / "server_local_agents.log") as base:
        yield base.replace("http://", "ws://") + "/ws"


async def test_the_local_llm_calls_tools_too(local_agent_server, llm_record, tmp_path):
    """The offline model (Qwen2.5-Coder 1.5B) writes its tool call as fenced JSON; it runs as a tool call, and the
    answer is spoken. (It says goodbye without calling end_call, so hanging up is Claude's test above.)"""
    from tests.helpers import Speaker, read_records

    ask = Speaker(tmp_path).say("ask", "What time is it in Tokyo right now?")
    before = len(read_records(llm_record))
    client = await connected_client(local_agent_server)
    await client.say(ask)
    await client.wait_reply_done(timeout=120)
    await client.stop()
    assert "5:41" in said(client.events), said(client.events)  # the tool's answer, through the model
    requests = read_records(llm_record)[before:]
    assert [t["function"]["name"] for t in requests[0]["tools"]] == ["get_time", "end_call"]
    # The request after the result: the tool's answer in the conversation, and no tools offered again.
    assert any(m["role"] == "tool" and "5:41 AM" in m["content"] for m in requests[-1]["messages"])
    assert "tools" not in requests[-1]


def test_json_logs_carry_the_session_id_on_every_line_of_a_session(local_agent_server, artifacts):
    """ATLAS_LOG_FORMAT=json (the local-agent server): Pipecat's lines and ours, logged on a session's behalf,
    carry its id; the secret-free fields are plain JSON."""
    lines = []
    for raw in (artifacts / "server_local_agents.log").read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue  # uvicorn's own lines
    started = [line for line in lines if " started (user " in line["message"]]
    assert started and {"time", "level", "message", "logger", "function", "line"} <= set(started[0])
    session = started[0]["session_id"]
    assert session in started[0]["message"]
    first = lines.index(started[0])
    last = next(i for i, line in enumerate(lines) if f"session {session} ended" in line["message"])
    # (llama-server's own output is relayed by a task of the process, not of a session)
    during = [
        line
        for line in lines[first : last + 1]
        if line["logger"].startswith(("pipecat.", "services.", "bots."))
        and line["logger"] != "services.local.llama_server"
    ]
    assert len(during) > 20 and all(line.get("session_id") == session for line in during), [
        line for line in during if line.get("session_id") != session
    ][:3]


async def test_a_sessions_voice_speed_reaches_elevenlabs_and_each_reply_reports_its_latency(
    agents_server, vendors, speech
):
    """`speed` in session_start becomes ElevenLabs' `speed` voice setting for that session only; the client gets
    `turn_metrics` as the reply starts to play; a speed out of bounds is refused before anything starts."""
    base, _db = agents_server
    eleven = vendors["elevenlabs"]
    n_eleven = len(eleven.connections)
    from app.talk import VoiceClient

    url = base.replace("http://", "ws://") + "/ws"
    client = VoiceClient(url, agent="recepcion", speed=1.15)
    await client.connect()
    await client.send_silence(0.3)
    await client.say(speech["dinner"])
    await client.wait_reply_done(timeout=60)
    await client.stop()
    contexts = [c for conn in eleven.connections[n_eleven:] for c in conn.contexts]
    assert contexts and all((c.voice_settings or {}).get("speed") == 1.15 for c in contexts), [
        c.voice_settings for c in contexts
    ]
    metrics = [e for e in client.events if e.get("type") == "turn_metrics"]
    assert metrics and metrics[0]["voiceToVoiceMs"] > 0 and metrics[0]["llmMs"] is not None, metrics
    order = [e["type"] for e in client.events]
    assert order.index("turn_metrics") < order.index("session_end")
    # Another session at the default speed sends no speed at all.
    n_eleven = len(eleven.connections)
    plain = VoiceClient(url, agent="recepcion")
    await plain.connect()
    await plain.send_silence(0.3)
    await plain.say(speech["dinner"])
    await plain.wait_reply_done(timeout=60)
    await plain.stop()
    assert all("speed" not in (c.voice_settings or {}) for conn in eleven.connections[n_eleven:] for c in conn.contexts)
    with pytest.raises(RuntimeError, match="INVALID_FIELD"):
        await VoiceClient(url, speed=2.0).connect()
