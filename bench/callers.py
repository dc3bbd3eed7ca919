"""Simulated callers for the benchmark: many at once in one event loop, as cheap as possible per frame.

Each caller streams a microphone in real time (20 ms frames, silence between utterances, as a phone or a
browser does), speaks an utterance, measures the reply as a listener would and speaks again once the
reply has played out. Two doors: `/ws` (the Atlas protocol: binary PCM up, `audio_chunk` JSON down) and
`/twilio/ws` (Twilio Media Streams: base64 mu-law JSON both ways, as fakes/twilio.py speaks it).

Per turn it records:
- voice-to-voice: the end of speech in the utterance (when that frame was sent) -> first reply audio in;
- gaps: the reply is played through a jitter buffer (`jitter` s of audio before playback starts, as a
  browser or Twilio does); every time the buffer runs dry before the reply ends is an audible gap;
- errors: no reply within `reply_timeout`, `error` messages (by code), a connection refused or dropped.

The tests' own clients (app.talk.VoiceClient, fakes.twilio.TwilioCaller) keep every message for
assertions; at 100 callers that bookkeeping would cost the benchmark more than the server, so these
keep counters only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import numpy as np

FRAME_SECS = 0.02


@dataclass
class Utterance:
    """16 kHz PCM16 speech with `speech_end` = seconds into it where the voice stops."""

    pcm16k: np.ndarray
    speech_end: float


@dataclass
class TurnRecord:
    caller: int
    index: int
    speech_end: float  # monotonic time the end of speech was sent
    first_audio: float | None = None
    reply_secs: float = 0.0
    gaps: int = 0
    gap_secs: float = 0.0
    error: str | None = None
    play_end: float = 0.0  # internal: when the jitter buffer runs dry

    @property
    def v2v_ms(self) -> float | None:
        return None if self.first_audio is None else (self.first_audio - self.speech_end) * 1000


@dataclass
class CallRecord:
    caller: int
    door: str
    started: float = 0.0
    ended: float = 0.0
    session_id: str | None = None
    turns: list[TurnRecord] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # code -> count (server `error`s and our own)
    session_end: dict | None = None

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


def _mulaw_table() -> np.ndarray:
    from fakes.twilio import mulaw_encode

    return np.frombuffer(mulaw_encode(np.arange(-32768, 32768, dtype=np.int16)), np.uint8)


ROOM_NOISE_RMS = 10.0  # -70 dBFS: a quiet room through a microphone, under every frame a caller sends


def room_noise(seconds: float, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, ROOM_NOISE_RMS, int(seconds * 16000)).astype(np.float32)


class Frames:
    """An utterance pre-cut into the frames each door sends (encoded once, shared by every caller), and a
    second of room noise as the frames sent between utterances."""

    def __init__(self, utterance: Utterance, door: str, mulaw: np.ndarray | None = None):
        self.frames = self._encode(utterance.pcm16k, door, mulaw)
        self.silence = self._encode(np.clip(room_noise(1.0), -32768, 32767).astype(np.int16), door, mulaw)
        self.end_frame = min(len(self.frames) - 1, int(np.ceil(utterance.speech_end / FRAME_SECS)) - 1)

    @staticmethod
    def _encode(pcm: np.ndarray, door: str, mulaw: np.ndarray | None) -> list:
        if door == "twilio":
            import soxr

            pcm8 = soxr.resample(pcm.astype(np.float32) / 32768.0, 16000, 8000)
            pcm8 = np.clip(pcm8 * 32768.0, -32768, 32767).astype(np.int16)
            n = 160
            pcm8 = np.concatenate([pcm8, np.zeros(-len(pcm8) % n, np.int16)])
            ulaw = mulaw[pcm8.astype(np.int32) + 32768]
            return [base64.b64encode(ulaw[i : i + n].tobytes()).decode() for i in range(0, len(ulaw), n)]
        n = 320
        pcm = np.concatenate([pcm, np.zeros(-len(pcm) % n, np.int16)])
        return [pcm[i : i + n].tobytes() for i in range(0, len(pcm), n)]


class Caller:
    """One simulated caller. `run()` calls until `until` (monotonic), then hangs up."""

    def __init__(
        self,
        index: int,
        door: str,
        url: str,
        utterances: list[Frames],
        http: aiohttp.ClientSession,
        *,
        jitter: float = 0.06,
        quiet: float = 1.0,
        reply_timeout: float = 15.0,
        pause: tuple[float, float] = (0.4, 1.2),
        twilio: tuple[str, str] | None = None,
    ) -> None:
        """`twilio`: (auth token, account SID) of a server whose phone door checks signatures (Atlas): each
        call then comes through the signed voice webhook first, as Twilio places it. None: the stream
        alone (bare Pipecat has no webhook)."""
        self.index, self.door, self.url, self.utterances, self.http = index, door, url, utterances, http
        self.twilio = twilio
        self.jitter, self.quiet, self.reply_timeout, self.pause = jitter, quiet, reply_timeout, pause
        self.record = CallRecord(caller=index, door=door)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.turn: TurnRecord | None = None
        self.out_rate = 8000 if door == "twilio" else 22050
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self._seq = 0
        self._closed = asyncio.Event()
        self._silences = utterances[0].silence if utterances else []
        self._n_silence = 0

    # ---- sending --------------------------------------------------------------------------------------

    def _quiet_frame(self):
        self._n_silence += 1
        return self._silences[self._n_silence % len(self._silences)]

    async def _send_frame(self, frame) -> None:
        if self.door == "ws":
            await self.ws.send_bytes(frame)
        else:
            self._seq += 1
            ts = (self._seq - 1) * 20
            await self.ws.send_str(
                f'{{"event":"media","sequenceNumber":"{self._seq + 1}","media":{{"track":"inbound",'
                f'"chunk":"{self._seq}","timestamp":"{ts}","payload":"{frame}"}},"streamSid":"{self.stream_sid}"}}'
            )

    async def _connect(self) -> None:
        if self.door == "twilio" and self.twilio is not None:
            await self._connect_signed()
            return
        self.ws = await self.http.ws_connect(self.url, max_msg_size=0, autoping=True, heartbeat=None)
        if self.door == "ws":
            await self.ws.send_str(
                json.dumps(
                    {
                        "type": "session_start",
                        "userId": f"bench-{self.index}",
                        "conversationId": f"bench-{uuid.uuid4().hex[:12]}",
                    }
                )
            )
            msg = await self.ws.receive(timeout=30)
            started = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else {}
            if started.get("type") != "session_started":
                raise ConnectionError(started.get("code") or f"refused ({msg.type.name})")
            self.record.session_id = started["sessionId"]
            self.out_rate = started["audioFormat"]["sampleRate"]
        else:
            call_sid = "CA" + uuid.uuid4().hex
            params = {"from": f"+1555{self.index:07d}", "to": "+15550000000"}
            await self._start_stream("AC" + uuid.uuid4().hex, call_sid, params)
            self.record.session_id = call_sid

    async def _start_stream(self, account_sid: str, call_sid: str, parameters: dict[str, str]) -> None:
        """Twilio's `connected` and `start` messages for this stream."""
        await self.ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {
            "accountSid": account_sid,
            "streamSid": self.stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await self.ws.send_str(
            json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid, "start": start})
        )

    async def _connect_signed(self) -> None:
        """The call as Twilio places it: the signed voice webhook, then the stream its TwiML names, signed."""
        from fakes.twilio import answer_call, twilio_signature

        token, account = self.twilio
        base = "http://" + self.url.split("://", 1)[1].split("/", 1)[0]
        plan = await answer_call(base, token, account_sid=account, from_=f"+1555{self.index:07d}", to="+15550000000")
        if plan.stream_url is None:
            raise ConnectionError("the webhook answered without a stream (busy)")
        headers = {"X-Twilio-Signature": twilio_signature(token, plan.stream_url)}
        self.ws = await self.http.ws_connect(self.url, max_msg_size=0, autoping=True, heartbeat=None, headers=headers)
        await self._start_stream(account, plan.call_sid, plan.parameters)
        self.record.session_id = plan.call_sid

    # ---- receiving ------------------------------------------------------------------------------------

    def _audio(self, seconds: float) -> None:
        now = time.monotonic()
        turn = self.turn
        if turn is None or turn.error == "NO_REPLY":
            self.record.error("LATE_AUDIO")
            return
        if turn.first_audio is None:
            turn.first_audio = now
            turn.play_end = now + self.jitter
        elif now > turn.play_end:
            turn.gaps += 1
            turn.gap_secs += now - turn.play_end
            turn.play_end = now
        turn.play_end += seconds
        turn.reply_secs += seconds

    async def _reader(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = msg.data
                if self.door == "twilio":
                    if '"media"' in data[:24]:  # {"event": "media", ...}: only the payload's length matters
                        i = data.find('"payload"')
                        if i >= 0:
                            q1 = data.index('"', i + 9)
                            self._audio((data.index('"', q1 + 1) - q1 - 1) * 3 / 4 / 8000)
                    continue
                if data.startswith('{"type": "audio_chunk"') or data.startswith('{"type":"audio_chunk"'):
                    event = json.loads(data)
                    self._audio(len(base64.b64decode(event["audio"])) / 2 / self.out_rate)
                    continue
                event = json.loads(data)
                kind = event.get("type")
                if kind == "error":
                    self.record.error(event.get("code", "?"))
                elif kind == "session_end":
                    self.record.session_end = event
        except Exception:  # noqa: BLE001 - a dropped connection is recorded below
            pass
        finally:
            self._closed.set()

    # ---- the call -------------------------------------------------------------------------------------

    async def run(self, until: float, offset: float = 0.0, max_turns: int | None = None) -> CallRecord:
        rec = self.record
        rec.started = time.monotonic()
        try:
            await self._connect()
        except Exception as e:  # noqa: BLE001
            rec.error(f"CONNECT_FAILED:{str(e)[:40]}")
            rec.ended = time.monotonic()
            return rec
        reader = asyncio.create_task(self._reader())
        t0 = time.monotonic()
        k = 0  # frames sent; frame k goes out at t0 + k * 20 ms

        async def tick(frame) -> bool:
            nonlocal k
            delay = t0 + k * FRAME_SECS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            k += 1
            if self._closed.is_set():
                return False
            try:
                await self._send_frame(frame)
            except Exception as e:  # noqa: BLE001
                rec.error(f"SEND_FAILED:{type(e).__name__}")
                return False
            return True

        try:
            for _ in range(int(offset / FRAME_SECS)):  # callers start out of step with each other
                if not await tick(self._quiet_frame()):
                    break
            i = 0
            while time.monotonic() < until and not self._closed.is_set() and i != max_turns:
                utt = self.utterances[i % len(self.utterances)]
                i += 1
                turn = None
                for j, frame in enumerate(utt.frames):
                    if not await tick(frame):
                        break
                    if j == utt.end_frame:
                        turn = self.turn = TurnRecord(self.index, len(rec.turns), time.monotonic())
                        rec.turns.append(turn)
                if turn is None:
                    break
                # the reply: silence until it has played out (or never came)
                while not self._closed.is_set():
                    now = time.monotonic()
                    if turn.first_audio is None and now - turn.speech_end > self.reply_timeout:
                        turn.error = "NO_REPLY"
                        break
                    if turn.first_audio is not None and now > turn.play_end + self.quiet:
                        break
                    if not await tick(self._quiet_frame()):
                        break
                for _ in range(int(random.uniform(*self.pause) / FRAME_SECS)):
                    if not await tick(self._quiet_frame()):
                        break
            if self._closed.is_set():
                rec.error("CLOSED_BY_SERVER")
                if self.turn is not None and self.turn.first_audio is None and self.turn.error is None:
                    self.turn.error = "CLOSED"
            await self._hang_up()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if self.ws is not None:
                await self.ws.close()
            rec.ended = time.monotonic()
        return rec

    async def _hang_up(self) -> None:
        if self._closed.is_set():
            return
        try:
            if self.door == "ws":
                await self.ws.send_str('{"type": "session_stop"}')
                await asyncio.wait_for(self._closed.wait(), 15)
            else:
                self._seq += 1
                await self.ws.send_str(
                    json.dumps(
                        {
                            "event": "stop",
                            "sequenceNumber": str(self._seq + 1),
                            "streamSid": self.stream_sid,
                            "stop": {"accountSid": "AC", "callSid": self.record.session_id},
                        }
                    )
                )
                await asyncio.wait_for(self._closed.wait(), 5)
        except (TimeoutError, ConnectionError, RuntimeError):
            self.record.error("HANGUP_TIMEOUT")


def make_utterances(texts: list[str]) -> list[Utterance]:
    """Piper speaks each text at 16 kHz (real speech, same every run) over room noise, with 0.3 s of it after."""
    from app.talk import speech_end_seconds
    from fakes.base import piper_pcm

    out = []
    for text in texts:
        pcm = np.frombuffer(piper_pcm(text, 16000), np.int16)
        pcm = np.concatenate([pcm, np.zeros(int(0.3 * 16000), np.int16)])
        end = speech_end_seconds(pcm)
        noisy = np.clip(pcm + room_noise(len(pcm) / 16000, seed=len(out)), -32768, 32767).astype(np.int16)
        out.append(Utterance(noisy, end))
    return out


def frames_for(utterances: list[Utterance], door: str) -> list[Frames]:
    mulaw = _mulaw_table() if door == "twilio" else None
    return [Frames(u, door, mulaw) for u in utterances]
