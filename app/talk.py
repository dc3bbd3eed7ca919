"""`atlas-voice talk`: a command-line client that speaks a WAV file to the server in real time.

It streams 20 ms PCM frames at the pace of a microphone, keeps streaming silence while Atlas
answers, measures each turn's voice-to-voice latency at the client (end of the user's speech in
the file -> first reply audio chunk received), prints every event and saves the reply audio.
The tests use the same `VoiceClient`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vocabulary.records import percentile, rounded

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

FRAME_MS = 20
IN_RATE = 16000


def load_wav(path: str | Path, rate_out: int = IN_RATE) -> np.ndarray:
    """Read a WAV as int16 mono at `rate_out` (mixing down and resampling when needed)."""
    with wave.open(str(path), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"{path}: only 16-bit PCM WAV is supported (sample width {width})")
    audio = np.frombuffer(raw, dtype=np.int16)
    if channels > 1:
        audio = audio.reshape(-1, channels).mean(axis=1).astype(np.int16)
    if rate != rate_out:
        import soxr

        audio = soxr.resample(audio.astype(np.float32) / 32768.0, rate, rate_out)
        audio = np.clip(audio * 32768.0, -32768, 32767).astype(np.int16)
    return audio


def speech_end_seconds(audio: np.ndarray, rate: int = IN_RATE, threshold: float = 500.0) -> float:
    """Where the last 20 ms frame louder than `threshold` RMS ends."""
    n = rate * FRAME_MS // 1000
    frames = len(audio) // n
    if frames == 0:
        return 0.0
    rms = np.sqrt((audio[: frames * n].astype(np.float32).reshape(frames, n) ** 2).mean(axis=1))
    loud = np.nonzero(rms > threshold)[0]
    return float((loud[-1] + 1) * n / rate) if len(loud) else 0.0


@dataclass
class TurnResult:
    audio_file: str
    speech_end: float  # client monotonic time the user's speech ended
    first_audio: float | None = None
    final_transcript: str | None = None
    confidence: float | None = None
    sentence_indexes: list[int] = field(default_factory=list)
    reply_bytes: int = 0
    flushed: bool = False

    @property
    def voice_to_voice_ms(self) -> float | None:
        return None if self.first_audio is None else round((self.first_audio - self.speech_end) * 1000, 1)


class VoiceClient:
    """A scripted user of the /ws protocol."""

    def __init__(
        self,
        url: str,
        *,
        on_event=None,
        user_id: str = "talk-cli",
        conversation_id: str | None = None,
        auth_token: str = "",
        agent: str | None = None,
        speed: float | None = None,
        reconnect: bool = False,
    ):
        """`reconnect`: when the connection drops mid-session (no session_end), connect again with backoff and
        resume the conversation with the session's resume token (session_start `resume`)."""
        self.url = url
        self.reconnect = reconnect
        self.resume_token: str | None = None
        self.reconnects = 0  # conversations resumed after a drop
        self._online = asyncio.Event()
        self._closing = False
        self.auth_token = auth_token
        self.agent = agent
        self.speed = speed
        self.on_event = on_event or (lambda e: None)
        self.user_id = user_id
        self.conversation_id = conversation_id or f"conv-{int(time.time() * 1000)}"
        self.events: list[dict] = []
        self.ws: ClientConnection  # set by connect()
        self.session_id: str | None = None
        self.out_rate = 22050
        self.reply_audio = bytearray()
        self.status = "listening"
        self.current: TurnResult | None = None
        self.turns: list[TurnResult] = []
        self.session_end: dict | None = None
        self._reader: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def connect(self) -> dict:
        import websockets

        self.ws = await websockets.connect(self.url, max_size=None)
        start: dict[str, str | float] = {
            "type": "session_start",
            "userId": self.user_id,
            "conversationId": self.conversation_id,
            "authToken": self.auth_token,
        }
        if self.agent:
            start["agent"] = self.agent
        if self.speed is not None:
            start["speed"] = self.speed
        await self.ws.send(json.dumps(start))
        started = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        if started.get("type") != "session_started":
            raise RuntimeError(f"server refused the session: {started}")
        self._started(started)
        self._reader = asyncio.create_task(self._read())
        return started

    def _started(self, started: dict) -> None:
        self.session_id = started["sessionId"]
        self.resume_token = started.get("resumeToken")
        self.out_rate = started["audioFormat"]["sampleRate"]
        self.events.append(started)
        self.on_event(started)
        self._online.set()

    def _should_reconnect(self) -> bool:
        code = getattr(self.ws, "close_code", None)
        return (
            self.reconnect
            and not self._closing
            and self.session_end is None
            and self.resume_token is not None
            and code not in (1000, 1008)  # a normal end, or a refusal: no point coming back
        )

    async def _resume(self) -> bool:
        """Connect again with backoff (0.5 s doubling, 6 tries) and resume the conversation; False if it cannot."""
        import websockets

        self._online.clear()
        delay = 0.5
        for _ in range(6):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8.0)
            try:
                ws = await websockets.connect(self.url, max_size=None)
            except OSError:
                continue
            start: dict = {
                "type": "session_start",
                "userId": self.user_id,
                "conversationId": self.conversation_id,
                "authToken": self.auth_token,
                "resume": {"sessionId": self.session_id, "token": self.resume_token},
            }
            if self.speed is not None:
                start["speed"] = self.speed
            await ws.send(json.dumps(start))
            try:
                answer = json.loads(await asyncio.wait_for(ws.recv(), 30))
            except Exception:
                await ws.close()
                continue
            if answer.get("type") != "session_started":
                self.events.append(answer)
                self.on_event(answer)
                await ws.close()
                return False  # RESUME_FAILED and the like: the conversation is over
            self.ws = ws
            self.reconnects += 1
            self._started(answer)
            return True
        return False

    async def _read(self) -> None:
        while True:
            await self._read_socket()
            if not (self._should_reconnect() and await self._resume()):
                break
        self._online.set()  # nothing to wait for any more
        self._changed.set()

    async def _send(self, data) -> None:
        """Send on the live socket; while it is being resumed, wait for it (what is sent meanwhile is lost, as on
        a phone line that drops)."""
        if not self._online.is_set():
            await asyncio.wait_for(self._online.wait(), 60)
        try:
            await self.ws.send(data)
        except Exception:
            if not self.reconnect or self.session_end is not None:
                raise

    async def _read_socket(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    continue
                event = json.loads(raw)
                event["_t"] = time.monotonic()
                self.events.append(event)
                kind = event.get("type")
                if kind == "audio_chunk":
                    pcm = base64.b64decode(event["audio"])
                    self.reply_audio += pcm
                    if self.current is not None:
                        if self.current.first_audio is None:
                            self.current.first_audio = event["_t"]
                        self.current.reply_bytes += len(pcm)
                        idx = event["sentenceIndex"]
                        if not self.current.sentence_indexes or self.current.sentence_indexes[-1] != idx:
                            self.current.sentence_indexes.append(idx)
                elif kind == "final_transcript" and self.current is not None:
                    self.current.final_transcript = (
                        (self.current.final_transcript or "") + " " + event["text"]
                    ).strip()
                    self.current.confidence = event.get("confidence")
                elif kind == "status":
                    self.status = event["status"]
                elif kind == "audio_flush" and self.current is not None:
                    self.current.flushed = True
                elif kind == "session_end":
                    self.session_end = event
                self.on_event(event)
                self._changed.set()
        except Exception:
            pass
        finally:
            self._changed.set()

    async def send_audio(self, pcm: np.ndarray, realtime: bool = True) -> None:
        n = IN_RATE * FRAME_MS // 1000
        t0 = time.monotonic()
        for i in range(0, len(pcm), n):
            await self._send(pcm[i : i + n].tobytes())
            if realtime:
                delay = t0 + (i // n + 1) * FRAME_MS / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    async def send_silence(self, seconds: float) -> None:
        await self.send_audio(np.zeros(int(IN_RATE * seconds), dtype=np.int16))

    async def say(self, path: str | Path, audio: np.ndarray | None = None) -> TurnResult:
        """Stream one utterance in real time; the turn starts counting at its speech end."""
        audio = load_wav(path) if audio is None else audio
        start = time.monotonic()
        turn = TurnResult(audio_file=str(path), speech_end=start + speech_end_seconds(audio))
        self.current = turn
        self.turns.append(turn)
        await self.send_audio(audio)
        return turn

    async def wait_reply_done(self, timeout: float = 60.0, quiet: float = 1.0) -> None:
        """Stream silence until the reply has played out (status back to listening) or timeout."""
        deadline = time.monotonic() + timeout
        n = IN_RATE * FRAME_MS // 1000
        silence = bytes(2 * n)
        t0 = time.monotonic()
        i = 0
        listening_since = None
        while time.monotonic() < deadline:
            await self._send(silence)
            i += 1
            delay = t0 + i * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            got_reply = self.current is not None and self.current.first_audio is not None
            if got_reply and self.status == "listening":
                listening_since = listening_since or time.monotonic()
                if time.monotonic() - listening_since >= quiet:
                    return
            else:
                listening_since = None
        raise TimeoutError(f"no complete reply within {timeout}s (status {self.status})")

    async def wait_for(self, predicate, timeout: float = 30.0, keep_audio: bool = True) -> dict:
        """Wait for an event matching predicate, streaming silence meanwhile if keep_audio."""
        deadline = time.monotonic() + timeout
        seen = 0
        n = IN_RATE * FRAME_MS // 1000
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if keep_audio and self.ws is not None and self.session_end is None:
                try:
                    await self.ws.send(bytes(2 * n))
                except Exception:
                    pass
            await asyncio.sleep(FRAME_MS / 1000)
        raise TimeoutError("expected event did not arrive")

    async def stop(self, timeout: float = 15.0) -> dict | None:
        self._closing = True
        await self.ws.send(json.dumps({"type": "session_stop"}))
        try:
            await self.wait_for(lambda e: e.get("type") == "session_end", timeout, keep_audio=False)
        finally:
            await self.close()
        return self.session_end

    async def close(self) -> None:
        self._closing = True
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=5)

    def save_reply(self, path: str | Path) -> None:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.out_rate)
            w.writeframes(bytes(self.reply_audio))


def _print_event(event: dict) -> None:
    kind = event.get("type")
    if kind == "audio_chunk":
        return  # summarized per turn
    shown = {k: v for k, v in event.items() if k not in ("_t",)}
    if kind == "session_end":
        shown = {**shown, "metrics": {k: v for k, v in shown["metrics"].items() if k != "turnBreakdown"}}
    print(json.dumps(shown), flush=True)


def pct(values: list[float], q: float) -> float | None:
    return rounded(percentile(values, q))


async def run_talk(
    url: str,
    wavs: list[str],
    repeat: int,
    out: str | None,
    timeout: float,
    agent: str | None = None,
    speed: float | None = None,
) -> int:
    client = VoiceClient(url, on_event=_print_event, agent=agent, speed=speed, reconnect=True)
    await client.connect()
    await client.send_silence(0.5)
    for _ in range(repeat):
        for wav in wavs:
            turn = await client.say(wav)
            try:
                await client.wait_reply_done(timeout=timeout)
            except TimeoutError as e:
                print(f"turn {len(client.turns)}: {e}")
            print(
                f"turn {len(client.turns)}: heard {turn.final_transcript!r}; "
                f"reply {turn.reply_bytes / 2 / client.out_rate:.2f}s "
                f"in sentences {turn.sentence_indexes}; voice-to-voice {turn.voice_to_voice_ms} ms",
                flush=True,
            )
    end = await client.stop()
    if out:
        client.save_reply(out)
        print(f"reply audio saved to {out}")
    v2v = [t.voice_to_voice_ms for t in client.turns if t.voice_to_voice_ms is not None]
    if v2v:
        print(f"voice-to-voice over {len(v2v)} turns: p50 {pct(v2v, 50)} ms, p95 {pct(v2v, 95)} ms")
    if end:
        breakdown = end["metrics"].get("turnBreakdown", [])
        for b in breakdown:
            print("server turn " + json.dumps(b))
        keys = [
            "vadStopMs",
            "sttMs",
            "turnEndMs",
            "llmFirstTokenMs",
            "firstSentenceMs",
            "ttsFirstAudioMs",
            "voiceToVoiceMs",
        ]
        print(
            "server breakdown (ms, p50 / p95): "
            + ", ".join(
                f"{k} {pct([b[k] for b in breakdown if b[k] is not None], 50)} / "
                f"{pct([b[k] for b in breakdown if b[k] is not None], 95)}"
                for k in keys
            )
        )
    return 0 if v2v else 1
