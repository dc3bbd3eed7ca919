"""The phone door (Twilio media streams) and the Daily door, on the same pipeline and telemetry as /ws, and the
per-process session cap on every door.

One Atlas server (a subprocess, as in production) with Whisper and Piper, Claude's fake for deterministic
replies, Twilio's REST API and Daily's REST API at local fakes, and ATLAS_MAX_SESSIONS=1.
A simulated Twilio media stream (fakes/twilio.py) speaks real speech as 20 ms mu-law frames.
"""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import numpy as np
import pytest
import websockets

from app.talk import VoiceClient
from fakes.anthropic import default_reply
from fakes.base import whisper_transcribe
from fakes.daily import FakeDailyAPI
from fakes.twilio import FakeTwilioREST, TwilioCaller, answer_call, new_sid, twilio_signature
from tests.conftest import reset_vendors
from tests.helpers import running_server, wer

pytestmark = pytest.mark.timeout(900)

MAX_SECS = 60  # the bot ends a call at this age (the hang-up test)
TOKEN = "test-twilio-auth-token"


@pytest.fixture(scope="module")
def twilio_rest():
    with FakeTwilioREST(auth_token=TOKEN) as fake:
        yield fake


@pytest.fixture(scope="module")
def daily_api():
    fake = FakeDailyAPI().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def doors(vendors, twilio_rest, daily_api, artifacts):
    env = {
        "ATLAS_STT": "whisper",
        "ATLAS_TTS": "piper",
        "ATLAS_LLM": "anthropic",
        "ATLAS_LLM_FALLBACK": "apology",
        "ANTHROPIC_API_KEY": "test-anthropic-key",
        "ANTHROPIC_BASE_URL": vendors["anthropic"].http_url,
        "TWILIO_ACCOUNT_SID": twilio_rest.account_sid,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "TWILIO_API_BASE_URL": twilio_rest.http_url,
        "DAILY_API_KEY": daily_api.api_key,
        "DAILY_API_URL": daily_api.api_url,
        "ATLAS_MAX_SESSIONS": "1",
        "ATLAS_SESSION_MAX_SECS": str(MAX_SECS),
        "ATLAS_SESSION_START_TIMEOUT_SECS": "8",
    }
    log = artifacts / "server_doors.log"
    with running_server(env, log) as base:
        yield base, log.with_suffix(".sqlite3")


@pytest.fixture(autouse=True)
def fresh(vendors):
    reset_vendors(vendors)


def session_rows(db, transport: str) -> list[dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [
            dict(r)
            for r in conn.execute(
                "select * from voice_sessions where transport = ? and ended_at is not null order by started_at",
                [transport],
            )
        ]


def wait_rows(db, transport: str, n: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = session_rows(db, transport) if db.exists() else []
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def heard_8k(pcm: bytes) -> str:
    import soxr

    audio = soxr.resample(np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0, 8000, 16000)
    return whisper_transcribe(np.clip(audio * 32767, -32768, 32767).astype(np.int16).tobytes())[0]


def voice_webhook(base: str, call_sid: str, *, signature: str | None = None) -> httpx.Response:
    url = base + "/twilio/voice"
    form = {
        "CallSid": call_sid,
        "AccountSid": "AC" + "0" * 32,
        "From": "+15550001111",
        "To": "+15550002222",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    sig = twilio_signature(TOKEN, url, form) if signature is None else signature
    return httpx.post(url, data=form, headers={"X-Twilio-Signature": sig})


async def test_voice_webhook_checks_the_signature_and_connects_a_stream(doors, twilio_rest):
    base, _ = doors
    call_sid = new_sid("CA")
    # Read as Twilio reads it: one well-formed XML document (a strict parser), not substrings.
    plan = await answer_call(
        base, TOKEN, account_sid=twilio_rest.account_sid, call_sid=call_sid, from_="+15550001111", to="+15550002222"
    )
    host = base.removeprefix("http://")
    assert plan.stream_url == f"wss://{host}/twilio/ws"
    assert plan.twiml.count("<?xml") == 1
    assert {k: v for k, v in plan.parameters.items() if k != "atlasToken"} == {
        "from": "+15550001111",
        "to": "+15550002222",
        "callSid": call_sid,
    }
    assert len(plan.parameters["atlasToken"]) < 500  # Twilio's limit on a <Parameter>
    assert voice_webhook(base, call_sid, signature="bm90IHRoZSByaWdodCBvbmU=").status_code == 403
    assert voice_webhook(base, call_sid, signature="").status_code == 403


async def test_phone_call_speaks_mulaw_barges_in_is_capped_and_is_hung_up_by_the_bot(
    doors, vendors, twilio_rest, speech, artifacts
):
    base, db = doors
    claude = vendors["anthropic"]
    call_sid = new_sid("CA")
    caller = await TwilioCaller.dial(
        base, TOKEN, account_sid=twilio_rest.account_sid, call_sid=call_sid, from_="+15550001111", to="+15550002222"
    )
    await caller.connect()
    started = time.monotonic()
    await caller.send_silence(0.5)

    # A turn: the reply comes back as 8 kHz mu-law speech saying what Claude's fake wrote.
    turn = await caller.say(speech["puppy"])
    await caller.wait_reply_done(timeout=60)
    said = claude.requests[-1].text_sent
    text = heard_8k(bytes(turn.reply_audio))
    assert said.startswith("I heard you say") and wer(said, text) <= 0.35, (said, text)
    assert caller.protocol_errors == []
    assert turn.voice_to_voice_ms is not None
    mark = await caller.wait_mark_echoed("reply-0", timeout=20)  # a mark after the reply, echoed once played
    assert mark.echoed_at is not None

    # The cap (1 session): every door refuses clearly while the call is live.
    busy = await answer_call(base, TOKEN, account_sid=twilio_rest.account_sid)
    assert busy.says and busy.hangup and busy.stream_url is None
    async with websockets.connect(base.replace("http://", "ws://") + "/ws") as ws:
        refused = json.loads(await ws.recv())
        assert refused["code"] == "SERVER_BUSY"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1013
    r = httpx.post(base + "/daily/start")
    assert r.status_code == 429 and r.json()["code"] == "SERVER_BUSY"

    # Barge-in: speaking over a long reply makes the server send `clear`.
    claude.reply = lambda body: " ".join(["Once upon a time there was a small dragon who could not fly."] * 6)
    claude.tokens_per_second = 8
    story = await caller.say(speech["story"])
    await caller.wait_for(lambda m: m.get("event") == "media" and m["_t"] > story.speech_end, timeout=30)
    claude.reply, claude.tokens_per_second = default_reply, 0
    await caller.send_silence(0.8)
    await caller.say(speech["cats"])
    await caller.wait_for(lambda m: m.get("event") == "clear", timeout=15)
    assert caller.clears

    # The bot ends the call at the maximum duration: the hang-up reaches Twilio's REST API.
    await caller.wait_closed(timeout=MAX_SECS + 30 - (time.monotonic() - started))
    hangups = [h for h in twilio_rest.hangups if h.call_sid == call_sid]
    assert len(hangups) == 1 and hangups[0].auth_ok and hangups[0].status == "completed"

    rows = wait_rows(db, "twilio", 1)
    row = [r for r in rows if r["conversation_id"] == call_sid][0]
    assert row["end_reason"] == "max_duration" and row["client_user_id"] == "+15550001111"
    assert row["turns_count"] >= 3 and row["interruptions_count"] >= 1
    assert row["avg_latency_ms"] > 0 and row["tts_characters"] > 0 and row["llm_output_tokens"] > 0


async def test_caller_hangs_up_cleanly_and_phone_vs_websocket_latency(doors, vendors, twilio_rest, speech, artifacts):
    base, db = doors
    before = len(session_rows(db, "twilio"))
    call_sid = new_sid("CA")
    phone, web = [], []
    for _ in range(2):
        caller = await TwilioCaller.dial(
            base, TOKEN, account_sid=twilio_rest.account_sid, call_sid=call_sid, from_="+15550003333"
        )
        await caller.connect()
        await caller.send_silence(0.5)
        for name in ("dinner", "puppy"):
            turn = await caller.say(speech[name])
            await caller.wait_reply_done(timeout=60)
            phone.append(turn.voice_to_voice_ms)
        await caller.hang_up()
        rows = wait_rows(db, "twilio", before + 1)
        before = len(rows)
        call_sid = new_sid("CA")

        # The same utterances over /ws, on the same server and engines.
        client = VoiceClient(base.replace("http://", "ws://") + "/ws")
        for _attempt in range(20):  # the phone call's slot is released a moment after its end
            try:
                await client.connect()
                break
            except RuntimeError:
                time.sleep(0.5)
        await client.send_silence(0.3)
        for name in ("dinner", "puppy"):
            turn = await client.say(speech[name])
            await client.wait_reply_done(timeout=60)
            web.append(turn.voice_to_voice_ms)
        await client.stop()

    ended = [r for r in session_rows(db, "twilio") if r["end_reason"] == "caller_hangup"]
    # Two utterances per call; over 8 kHz audio smart-turn sometimes ends a turn at the pause after "Hi Atlas,"
    # and the rest of the sentence is a turn of its own (seen once on CI: 3 turns), so at least 2.
    assert len(ended) == 2 and all(r["turns_count"] >= 2 for r in ended), ended
    # The caller hung up first: no hang-up request for a call that is already over.
    assert not [h for h in twilio_rest.hangups if h.call_sid in {r["conversation_id"] for r in ended}]
    assert all(v is not None for v in phone + web)
    # The phone door's replies are asked for at the pause too (processors/turn_end.py), as /ws's are.
    with sqlite3.connect(db) as conn:
        preempted = conn.execute(
            "select s.transport, count(*) from voice_turns t join voice_sessions s on s.id = t.session_id"
            " where t.preempted = 1 group by s.transport"
        ).fetchall()
    assert {transport for transport, n in preempted if n} == {"twilio", "websocket"}, preempted
    result = {
        "phone_v2v_ms": phone,
        "websocket_v2v_ms": web,
        "phone_p50_ms": float(np.percentile(phone, 50)),
        "websocket_p50_ms": float(np.percentile(web, 50)),
    }
    (artifacts / "phone_vs_websocket.json").write_text(json.dumps(result, indent=1))


async def test_daily_start_creates_a_room_and_runs_the_bot(doors, daily_api):
    base, db = doors
    deadline = time.monotonic() + 20
    # An agent the server does not have is refused before any room is made (a JSON body, or `?agent=`).
    rooms = len(daily_api.requests)
    r = httpx.post(base + "/daily/start", json={"agent": "concierge"}, timeout=20)
    assert r.status_code == 400 and r.json()["code"] == "UNKNOWN_AGENT"
    assert httpx.post(base + "/daily/start?agent=x", timeout=20).json()["code"] == "UNKNOWN_AGENT"
    assert len(daily_api.requests) == rooms
    while True:  # the earlier sessions' slot may still be closing
        r = httpx.post(base + "/daily/start", json={"agent": "atlas"}, timeout=20)
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    body = r.json()
    name = body["roomUrl"].rsplit("/", 1)[1]
    assert body["roomUrl"] == daily_api.room_url(name)
    assert (body["dailyRoom"], body["dailyToken"]) == (body["roomUrl"], body["token"])  # Pipecat clients' keys
    props = daily_api.room_properties(name)
    assert props["eject_at_room_exp"] is True and abs(props["exp"] - (time.time() + MAX_SECS)) < 15
    token = daily_api.decode_token(body["token"])
    assert token["room_name"] == name and not token.get("is_owner")
    assert body["expiresAt"] == props["exp"]
    # The bot cannot reach Daily from here: it gives up (no participant, or the join fails), the session is
    # recorded as a daily session, and the room is deleted.
    rows = wait_rows(db, "daily", 1, timeout=60)
    assert rows and rows[-1]["id"] == body["sessionId"], rows
    assert rows[-1]["agent"] == "atlas"
    assert rows[-1]["end_reason"] in ("no_participant", "join_failed")
    deadline = time.monotonic() + 20
    while name not in daily_api.deleted_rooms and time.monotonic() < deadline:
        time.sleep(0.3)
    assert name in daily_api.deleted_rooms

    # Daily refusing (a bad key, an outage) is a clear 502, and the slot is given back.
    daily_api.fail_next(500, endpoint="rooms")
    r = httpx.post(base + "/daily/start", timeout=20)
    assert r.status_code == 502 and r.json()["code"] == "DAILY_API_ERROR"
    assert "key" not in r.text.lower()
