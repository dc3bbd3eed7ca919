"""Self-tests of the Twilio fakes: FakeTwilioREST driven by Pipecat's real TwilioFrameSerializer hang-up, the
caller's G.711 codec against audioop, and TwilioCaller against a small in-test bot that speaks through Pipecat's
TwilioFrameSerializer (so both directions are checked against the client Atlas will use). No internet; < 30 s."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import warnings
import wave
from collections.abc import Awaitable, Callable

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.clocks.system_clock import SystemClock
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.utils.asyncio.task_manager import TaskManager

from fakes.twilio import (
    FRAME_BYTES,
    FakeTwilioREST,
    TwilioCaller,
    mulaw_decode,
    mulaw_encode,
    new_sid,
    twilio_signature,
)

TOKEN = "test-twilio-auth-token"


def pipecat_setup(rate: int = 16000) -> FrameProcessorSetup:
    """What Pipecat's transport passes to `serializer.setup()` (1.14 takes a FrameProcessorSetup)."""
    return FrameProcessorSetup(
        clock=SystemClock(),
        task_manager=TaskManager(),
        pipeline_worker=None,
        audio_in_sample_rate=rate,
        audio_out_sample_rate=rate,
    )


def basic(login: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 8000.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


# ---- REST ----------------------------------------------------------------------------------------------


@pytest.fixture
def rest():
    with FakeTwilioREST(new_sid("AC"), TOKEN, api_keys={"SK" + "1" * 32: "key-secret"}) as fake:
        yield fake


async def hang_up_with(fake: FakeTwilioREST, call_sid: str, frame=None, **creds) -> None:
    serializer = TwilioFrameSerializer(new_sid("MZ"), call_sid, fake.account_sid, base_url=fake.http_url, **creds)
    await serializer.setup(pipecat_setup())
    assert await serializer.serialize(frame or EndFrame()) is None  # the hang-up is a side effect


async def test_rest_hang_up_with_auth_token_like_pipecat(rest):
    call = new_sid("CA")
    await hang_up_with(rest, call, auth_token=TOKEN)
    [h] = rest.hangups
    assert (h.call_sid, h.status, h.auth_ok, h.response_status) == (call, "completed", True, 200)
    assert h.login == rest.account_sid and h.params == {"Status": "completed"}
    [req] = rest.requests
    assert req.method == "POST" and req.path == f"/2010-04-01/Accounts/{rest.account_sid}/Calls/{call}.json"
    assert req.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert req.headers["authorization"].startswith("Basic ")
    assert rest.calls[call]["status"] == "completed"


async def test_rest_hang_up_with_api_key_and_on_cancel(rest):
    call = new_sid("CA")
    await hang_up_with(rest, call, CancelFrame(), api_key_sid="SK" + "1" * 32, api_key_secret="key-secret")
    [h] = rest.hangups
    assert h.auth_ok and h.login == "SK" + "1" * 32 and h.response_status == 200


async def test_rest_bad_credentials_get_twilio_401(rest):
    call = new_sid("CA")
    await hang_up_with(rest, call, auth_token="wrong-token")  # Pipecat logs the error, never raises
    [h] = rest.hangups
    assert (h.auth_ok, h.response_status, h.error_code) == (False, 401, 20003)
    assert call not in rest.calls
    async with aiohttp.ClientSession() as s:
        async with s.post(rest.call_url(call), data={"Status": "completed"}) as r:  # no credentials at all
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
            assert await r.json() == {
                "code": 20003,
                "message": "Authenticate",
                "more_info": "https://www.twilio.com/docs/errors/20003",
                "status": 401,
            }
        other = new_sid("AC")  # right token, someone else's account in the path
        async with s.post(
            rest.call_url(call, other), data={"Status": "completed"}, headers=basic(rest.account_sid, TOKEN)
        ) as r:
            assert r.status == 401


async def test_rest_unknown_and_ended_calls_are_404_20404():
    known = new_sid("CA")
    with FakeTwilioREST(new_sid("AC"), TOKEN, known_calls=[known]) as fake:
        await hang_up_with(fake, new_sid("CA"), auth_token=TOKEN)
        await hang_up_with(fake, known, auth_token=TOKEN)
        await hang_up_with(fake, known, auth_token=TOKEN)  # already ended
        assert [(h.response_status, h.error_code) for h in fake.hangups] == [(404, 20404), (200, None), (404, 20404)]
        auth = basic(fake.account_sid, TOKEN)
        async with aiohttp.ClientSession() as s:
            async with s.post(fake.call_url("CAnotasid"), data={"Status": "completed"}, headers=auth) as r:
                body = await r.json()
                assert r.status == 404 and body["code"] == 20404 and body["status"] == 404
                assert body["more_info"] == "https://www.twilio.com/docs/errors/20404"
            async with s.get(fake.call_url(known), headers=auth) as r:
                call = await r.json()
            assert r.status == 200 and r.headers["Twilio-Request-Id"].startswith("RQ")
            assert call["sid"] == known and call["status"] == "completed" and call["account_sid"] == fake.account_sid
            assert call["end_time"].endswith("+0000") and call["duration"] is not None
            assert call["uri"] == f"/2010-04-01/Accounts/{fake.account_sid}/Calls/{known}.json"


async def test_rest_validates_update_parameters_and_scripted_faults(rest):
    call = rest.call_url(new_sid("CA"))
    auth = basic(rest.account_sid, TOKEN)
    async with aiohttp.ClientSession() as s:
        async with s.post(call, data={"Status": "busy"}, headers=auth) as r:
            assert r.status == 400 and (await r.json())["code"] == 20001
        async with s.post(call, json={"Status": "completed"}, headers=auth) as r:  # not a form: no parameters
            assert r.status == 400
        rest.fail_next(503, 20503, "Service Unavailable")
        async with s.post(call, data={"Status": "completed"}, headers=auth) as r:
            assert r.status == 503 and (await r.json())["code"] == 20503
        async with s.post(call, data={"Status": "completed"}, headers=auth) as r:
            assert r.status == 200 and (await r.json())["status"] == "completed"
    assert [u.response_status for u in rest.updates] == [400, 400, 503, 200]
    assert [h.response_status for h in rest.hangups] == [503, 200]


# ---- codec -----------------------------------------------------------------------------------------------


def test_mulaw_codec_matches_audioop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    rng = np.random.default_rng(7)
    pcm = (
        np.concatenate(
            [
                rng.integers(-32768, 32768, 20000),
                rng.normal(0, 300, 5000).clip(-32768, 32767),
                [-32768, -32767, -8160, -1, 0, 1, 8159, 32767],
            ]
        )
        .astype(np.int16)
        .tobytes()
    )
    assert mulaw_encode(pcm) == audioop.lin2ulaw(pcm, 2)
    codes = bytes(range(256))
    assert mulaw_decode(codes) == audioop.ulaw2lin(codes, 2)
    assert mulaw_decode(mulaw_encode(b"\0\0" * 4)) == b"\0\0" * 4  # silence is exact


def test_signature_is_twilio_hmac_sha1():
    # Twilio's documented example (webhook security): URL + sorted POST params, auth token 12345
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    assert twilio_signature("12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


# ---- the caller against a stub bot -----------------------------------------------------------------------


class StubBot:
    """A Media Stream server: records what the caller sends (with arrival times) and runs `script(bot)` after
    `start`, replying through Pipecat's TwilioFrameSerializer for the stream in `start`."""

    def __init__(self, script: Callable[[StubBot], Awaitable[None]] | None = None) -> None:
        self.script = script
        self.messages: list[dict] = []
        self.times: list[float] = []
        self.frames: list = []  # what Pipecat's serializer deserialized
        self.headers: dict[str, str] = {}
        self.ws: web.WebSocketResponse | None = None
        self.serializer: TwilioFrameSerializer | None = None
        self.sent_payloads: list[str] = []
        self.closed = asyncio.Event()
        self.started = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> StubBot:
        app = web.Application()
        app.router.add_get("/twilio/ws", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}/twilio/ws"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    @property
    def stream_sid(self) -> str:
        return self.messages[1]["streamSid"]

    def of(self, event: str) -> list[dict]:
        return [m for m in self.messages if m.get("event") == event]

    async def send_audio(self, pcm16k: np.ndarray, chunk_ms: int = 20) -> None:
        n = 16000 * chunk_ms // 1000
        for i in range(0, len(pcm16k), n):
            frame = OutputAudioRawFrame(pcm16k[i : i + n].tobytes(), sample_rate=16000, num_channels=1)
            text = await self.serializer.serialize(frame)
            if text:
                self.sent_payloads.append(json.loads(text)["media"]["payload"])
                await self.ws.send_str(text)

    async def send(self, message: dict | str | bytes) -> None:
        if isinstance(message, bytes):
            await self.ws.send_bytes(message)
        else:
            await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        self.headers = dict(request.headers)
        self.ws = ws = web.WebSocketResponse()
        await ws.prepare(request)
        task = None
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            self.messages.append(message)
            self.times.append(time.monotonic())
            if message["event"] == "start":
                self.serializer = TwilioFrameSerializer(
                    message["start"]["streamSid"], params=TwilioFrameSerializer.InputParams(auto_hang_up=False)
                )
                await self.serializer.setup(pipecat_setup())
                self.started.set()
                if self.script:
                    task = asyncio.create_task(self.script(self))
            elif self.serializer is not None:
                frame = await self.serializer.deserialize(msg.data)
                if frame is not None:
                    self.frames.append(frame)
        if task is not None:
            task.cancel()
        self.closed.set()
        return ws


async def test_caller_streams_twilio_messages_in_real_time(tmp_path):
    wav = tmp_path / "tone.wav"
    with wave.open(str(wav), "wb") as w:  # 16 kHz: the caller resamples to 8 kHz
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tone(0.4, 16000).tobytes())
    async with StubBot() as bot:
        caller = TwilioCaller(bot.url, custom_parameters={"userId": "u-1"}, auth_token=TOKEN)
        await caller.connect()
        await caller.send_silence(0.1)
        turn = await caller.say(wav)
        await caller.send_dtmf("5")
        await caller.send_silence(0.1)
        await caller.hang_up()
        await asyncio.wait_for(bot.closed.wait(), 5)

    assert bot.headers["X-Twilio-Signature"] == twilio_signature(TOKEN, bot.url)
    assert bot.headers["User-Agent"] == "Twilio.TmeWs/1.0"
    msgs = bot.messages
    assert msgs[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert msgs[1] == {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": caller.account_sid,
            "streamSid": caller.stream_sid,
            "callSid": caller.call_sid,
            "tracks": ["inbound"],
            "customParameters": {"userId": "u-1"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": caller.stream_sid,
    }
    assert [int(m["sequenceNumber"]) for m in msgs[1:]] == list(range(1, len(msgs)))
    assert all(m["streamSid"] == caller.stream_sid for m in msgs[1:])
    assert msgs[-1] == {
        "event": "stop",
        "sequenceNumber": str(len(msgs) - 1),
        "stop": {"accountSid": caller.account_sid, "callSid": caller.call_sid},
        "streamSid": caller.stream_sid,
    }

    media = bot.of("media")
    assert len(media) >= 25
    assert [int(m["media"]["chunk"]) for m in media] == list(range(1, len(media) + 1))
    stamps = [int(m["media"]["timestamp"]) for m in media]
    assert stamps[0] == 0 and set(np.diff(stamps)) == {20}
    assert all(
        m["media"]["track"] == "inbound" and set(m["media"]) == {"track", "chunk", "timestamp", "payload"}
        for m in media
    )
    payloads = [base64.b64decode(m["media"]["payload"]) for m in media]
    assert {len(p) for p in payloads} == {FRAME_BYTES}
    # real time: arrivals span the stream's own duration, to within a frame or two
    arrivals = [t for t, m in zip(bot.times, msgs, strict=False) if m.get("event") == "media"]
    assert abs((arrivals[-1] - arrivals[0]) - (len(media) - 1) * 0.02) < 0.05

    # the tone is there, between silence, with the speech end where the turn says
    pcm = np.frombuffer(mulaw_decode(b"".join(payloads)), np.int16).astype(np.float32)
    rms = np.sqrt((pcm.reshape(-1, 160) ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > 1000)
    assert len(loud) == 20 and np.all(np.diff(loud) == 1) and rms[0] == 0 and rms[-1] == 0
    assert turn.speech_end - turn.speech_start == pytest.approx(0.4, abs=0.021)
    assert turn.speech_start == pytest.approx(caller.stream_start + loud[0] * 0.02, abs=1e-6)

    [dtmf] = bot.of("dtmf")
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "5"}
    # Pipecat's serializer takes all of it: 16 kHz input audio and the keypress
    audio = [f for f in bot.frames if isinstance(f, InputAudioRawFrame)]
    assert all(f.sample_rate == 16000 for f in audio)  # its stream resampler hands audio on in ~95 ms blocks
    assert (len(media) - 10) * 640 <= sum(len(f.audio) for f in audio) <= len(media) * 640
    assert [f.button for f in bot.frames if isinstance(f, InputDTMFFrame)] == [KeypadEntry.FIVE]
    assert not caller.protocol_errors and not caller.closed_by_server


async def test_caller_plays_reply_echoes_mark_after_playback_and_measures_voice_to_voice():
    reply = tone(0.5, 16000, freq=300)

    async def bot_script(bot: StubBot) -> None:  # answer after 240 ms (12 frames) of silence following speech
        last_loud, checked = None, 0
        while True:
            await asyncio.sleep(0.005)
            media = bot.of("media")
            for i in range(checked, len(media)):
                pcm = np.frombuffer(mulaw_decode(base64.b64decode(media[i]["media"]["payload"])), np.int16)
                if np.abs(pcm).max() > 1000:
                    last_loud = i
            checked = len(media)
            if last_loud is not None and checked - 1 - last_loud >= 12:
                break
        bot.replied_at = time.monotonic()
        await bot.send_audio(reply)
        await bot.send({"event": "mark", "streamSid": bot.stream_sid, "mark": {"name": "reply-1"}})

    async with StubBot(bot_script) as bot:
        async with TwilioCaller(bot.url) as caller:
            await caller.send_silence(0.1)
            turn = await caller.say(audio=tone(0.3, 8000))
            done = await caller.wait_reply_done(timeout=5, quiet=0.3)
            assert done is turn
            # the echo is sent when playback ends; give the bot's reader a moment to take it off the socket
            for _ in range(200):
                if echoed := bot.of("mark"):
                    break
                await asyncio.sleep(0.01)

    assert not caller.protocol_errors
    assert turn.first_audio is not None and 220 < turn.voice_to_voice_ms < 600
    assert turn.first_audio >= bot.replied_at
    # the reply is exactly what Pipecat encoded, decoded to 8 kHz PCM16
    sent = b"".join(base64.b64decode(p) for p in bot.sent_payloads)
    assert bytes(turn.reply_audio) == bytes(caller.reply_audio) == mulaw_decode(sent)
    assert turn.reply_seconds == pytest.approx(0.5, abs=0.03)
    assert len(turn.media_times) == len(bot.sent_payloads)
    # the mark came back once the audio before it had played (real time from the first chunk), not at once
    [mark] = caller.marks
    assert mark.name == "reply-1" and not mark.cleared and turn.marks == ["reply-1"]
    assert mark.echoed_at - turn.first_audio == pytest.approx(len(sent) / 8000, abs=0.06)
    assert mark.echoed_at - mark.received_at > 0.3
    assert echoed == [
        {
            "event": "mark",
            "sequenceNumber": echoed[0]["sequenceNumber"],
            "streamSid": caller.stream_sid,
            "mark": {"name": "reply-1"},
        }
    ]


async def test_clear_drops_queued_audio_and_flushes_marks_at_once():
    async def bot_script(bot: StubBot) -> None:
        await bot.send_audio(tone(2.0, 16000))  # 2 s queued at once
        await bot.send({"event": "mark", "streamSid": bot.stream_sid, "mark": {"name": "long"}})
        await asyncio.sleep(0.3)
        bot.cleared_at = time.monotonic()
        await bot.send(await bot.serializer.serialize(InterruptionFrame()))  # Pipecat's `clear`
        await asyncio.sleep(0.1)
        await bot.send({"event": "mark", "streamSid": bot.stream_sid, "mark": {"name": "empty"}})

    async with StubBot(bot_script) as bot:
        async with TwilioCaller(bot.url) as caller:
            long = await caller.wait_mark_echoed("long", timeout=3)
            assert not caller.is_playing
            empty = await caller.wait_mark_echoed("empty", timeout=3)
            await asyncio.sleep(0.05)

    assert not caller.protocol_errors
    assert long.cleared and long.echoed_at - bot.cleared_at < 0.1  # not after the 2 s of audio
    [clear] = caller.clears
    assert clear.marks_flushed == ["long"] and 1500 < clear.dropped_ms < 1750
    assert not empty.cleared and empty.echoed_at - empty.received_at < 0.05  # nothing queued: echoed at once
    assert [m["mark"]["name"] for m in bot.of("mark")] == ["long", "empty"]


async def test_protocol_errors_and_the_bot_hanging_up():
    async def bot_script(bot: StubBot) -> None:
        sid = bot.stream_sid
        good = base64.b64encode(mulaw_encode(tone(0.02, 8000))).decode()
        await bot.send({"event": "media", "streamSid": "MZwrong", "media": {"payload": good}})
        await bot.send({"event": "media", "streamSid": sid, "media": {"payload": "not base64!"}})
        await bot.send({"event": "playAudio", "streamSid": sid})
        await bot.send(b"\x00\x01")
        await bot.send(
            {"event": "media", "streamSid": sid, "media": {"payload": base64.b64encode(b"RIFF" + bytes(156)).decode()}}
        )
        await bot.send({"event": "mark", "streamSid": sid, "mark": {}})
        await bot.send("{not json")
        await bot.send({"event": "media", "streamSid": sid, "media": {"payload": good}})
        await asyncio.sleep(0.1)
        await bot.ws.close()  # the bot hangs up

    async with StubBot(bot_script) as bot:
        caller = TwilioCaller(bot.url)
        await caller.connect()
        await caller.wait_closed(timeout=3)
        await caller.hang_up()  # a no-op now
        with pytest.raises(ConnectionError):
            await caller.say(audio=tone(0.1, 8000))

    errors = caller.protocol_errors
    assert len(errors) == 7, errors
    assert "streamSid 'MZwrong'" in errors[0] and "not base64" in errors[1] and "playAudio" in errors[2]
    assert "binary" in errors[3] and "file header" in errors[4] and "mark without a name" in errors[5]
    assert "not JSON" in errors[6]
    assert len(caller.reply_audio) == 2 * 160 * 2  # the WAV-headed chunk still played, the wrong stream's didn't
    assert caller.closed_by_server and caller.closed_at is not None and caller.close_code == 1000
    assert not bot.of("stop")


async def test_wait_reply_done_before_any_turn_waits_for_the_greeting_to_play():
    async def bot_script(bot: StubBot) -> None:
        await asyncio.sleep(0.1)
        await bot.send_audio(tone(0.3, 16000))

    async with StubBot(bot_script) as bot:
        async with TwilioCaller(bot.url) as caller:
            t0 = time.monotonic()
            assert await caller.wait_reply_done(timeout=3, quiet=0.1) is None
            waited = time.monotonic() - t0
    # Pipecat's streaming resampler holds back the last ~0.1 s until more audio comes: play what arrived
    played = len(caller.reply_audio) / 2 / 8000
    sent = b"".join(base64.b64decode(p) for p in bot.sent_payloads)
    assert bytes(caller.reply_audio) == mulaw_decode(sent) and played > 0.15
    first = caller.received[0]["_t"] - t0
    assert first + played - 0.01 <= waited <= first + played + 0.1
    assert not caller.turns and not caller.is_playing
