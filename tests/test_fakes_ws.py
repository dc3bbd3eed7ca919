"""The fake Deepgram and ElevenLabs servers, proven through the real clients: Pipecat's own services
(DeepgramSTTService, ElevenLabsTTSService) in a pipeline, deepgram-sdk's typed socket client, and
`websockets` speaking ElevenLabs' multi-context protocol exactly as Pipecat does. No internet."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import websockets
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.core import ApiError
from deepgram.core.events import EventType
from deepgram.listen.v1.types import (
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from pipecat.frames.frames import (
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
from pipecat.tests.utils import SleepFrame, run_test

from fakes.base import piper_pcm
from fakes.deepgram import FakeDeepgram, g711_decode
from fakes.elevenlabs import FakeElevenLabs, cached_piper_pcm
from tests.helpers import wer, words

PUPPY = "Hi Atlas, can you suggest a good name for my new puppy?"
VOICE = "21m00Tcm4TlvDq8EAJjs"
DG_KEY = "test-deepgram-key"
EL_KEY = "test-elevenlabs-key"
# What Pipecat's DeepgramSTTService sends (its defaults) plus Atlas' endpointing and utterance end.
DG_QUERY = dict(
    model="nova-3-general",
    language="en",
    encoding="linear16",
    sample_rate="16000",
    channels="1",
    multichannel="false",
    interim_results="true",
    punctuate="true",
    smart_format="false",
    endpointing="300",
    utterance_end_ms="1000",
    vad_events="true",
)


@pytest.fixture(scope="module")
def puppy() -> bytes:
    return piper_pcm(PUPPY, 16000)


def trim_tail(pcm: bytes) -> bytes:
    """Cut Piper's trailing quiet (its length varies run to run) to end 40 ms after the last loud frame."""
    frames = np.frombuffer(pcm[: len(pcm) // 640 * 640], "<i2").astype(np.float64).reshape(-1, 320)
    loud = np.flatnonzero(np.sqrt(np.mean(frames**2, axis=1)) / 32768 > 10 ** (-45 / 20))
    return pcm[: (loud[-1] + 3) * 640]


def silence(seconds: float, rate: int = 16000) -> bytes:
    return b"\0\0" * int(seconds * rate)


def dg_client(fake: FakeDeepgram, key: str = DG_KEY) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(
        base=fake.http_url, production=fake.ws_url, agent=fake.ws_url, agent_rest=fake.http_url
    )
    return AsyncDeepgramClient(api_key=key, environment=env)


async def send_chunks(connection, audio: bytes, chunk: int = 640) -> None:
    for i in range(0, len(audio), chunk):  # 20 ms of 16 kHz PCM16 per message
        await connection.send_media(audio[i : i + chunk])


async def handshake_status(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, additional_headers=headers or {}, open_timeout=5):
            pass
    response = info.value.response
    return response.status_code, dict(response.headers), response.body


# --- Deepgram -------------------------------------------------------------------------------------


async def test_deepgram_whisper_mode_through_pipecat(puppy):
    """Pipecat's DeepgramSTTService (deepgram-sdk underneath) gets interims and the Whisper final."""
    with FakeDeepgram(interim_every=0.8) as dg:
        stt = DeepgramSTTService(
            api_key=DG_KEY,
            base_url=dg.ws_url,
            sample_rate=16000,
            settings=DeepgramSTTService.Settings(endpointing=300, utterance_end_ms=1000),
        )
        audio = silence(0.3) + puppy + silence(1.0)
        half = len(silence(0.3)) + len(puppy) // 2 // 640 * 640
        frames = [InputAudioRawFrame(audio[i : i + 640], 16000, 1) for i in range(0, len(audio), 640)]
        cut = half // 640
        down, _ = await run_test(
            stt,
            # The last pause leaves the fake's Whisper time for the final, even on a busy machine.
            frames_to_send=[*frames[:cut], SleepFrame(1.0), *frames[cut:], SleepFrame(5.0)],
            pipeline_params=PipelineParams(audio_in_sample_rate=16000),
            start_timeout=10,
        )
        finals = [f.text for f in down if isinstance(f, TranscriptionFrame)]
        interims = [f.text for f in down if isinstance(f, InterimTranscriptionFrame)]
        assert len(finals) == 1 and wer(PUPPY, finals[0]) <= 0.1, finals
        assert interims and all(wer(" ".join(words(PUPPY)[: len(words(i))]), i) <= 0.34 for i in interims), interims
        conn = dg.connections[0]
        assert conn.query["model"] == "nova-3-general" and conn.query["endpointing"] == "300"
        assert conn.headers["authorization"] == f"Token {DG_KEY}"
        assert abs(conn.audio_seconds - len(audio) / 32000) < 0.05
        assert dg.wait_until(lambda: {"type": "CloseStream"} in conn.control, 5)  # Pipecat's stop
        assert dg.finals == finals


async def test_deepgram_sdk_parses_typed_messages_scripted(puppy):
    """Scripted mode (no Whisper): every documented message reaches the SDK as its pydantic type."""
    script = ["Hello from the script.", "Second one."]
    with FakeDeepgram(transcripts=script, interim_every=0.5, final_delay=0.2) as dg:
        got: list = []
        async with dg_client(dg).listen.v1.connect(**DG_QUERY) as connection:

            async def on_message(message):
                got.append(message)

            connection.on(EventType.MESSAGE, on_message)
            listener = asyncio.create_task(connection.start_listening())
            await send_chunks(connection, silence(0.5) + puppy + silence(1.5))  # ended by endpointing
            await connection.send_keep_alive()
            await send_chunks(connection, trim_tail(puppy) + silence(0.1))  # Finalize comes before endpointing
            await connection.send_finalize()
            await send_chunks(connection, silence(1.2))
            await connection.send_close_stream()
            await asyncio.wait_for(listener, 10)
    kinds = [type(m) for m in got]
    assert not any(isinstance(m, dict) for m in got), got
    assert ListenV1SpeechStarted in kinds and kinds[-1] is ListenV1Metadata
    results = [m for m in got if isinstance(m, ListenV1Results)]
    interims = [m for m in results if not m.is_final]
    finals = [m for m in results if m.is_final]
    assert interims and all(any(t.startswith(m.channel.alternatives[0].transcript) for t in script) for m in interims)
    spoken = [m for m in finals if m.channel.alternatives[0].transcript]
    assert [m.channel.alternatives[0].transcript for m in spoken] == script
    assert spoken[0].speech_final and not spoken[0].from_finalize
    assert spoken[1].from_finalize and not spoken[1].speech_final
    alt = spoken[0].channel.alternatives[0]
    assert alt.confidence > 0.9 and [w.punctuated_word for w in alt.words] == ["Hello", "from", "the", "script."]
    assert 0.4 < alt.words[0].start < alt.words[-1].end < 0.5 + len(puppy) / 32000 + 0.1
    assert spoken[0].metadata.model_info.arch == "nova-3" and spoken[0].channel_index == [0, 1]
    # Finals tile the connection's audio timeline (what a client's replay buffer relies on).
    assert finals[0].start == 0.0
    assert all(abs(a.start + a.duration - b.start) < 1e-6 for a, b in zip(finals, finals[1:], strict=False))
    ends = [m for m in got if isinstance(m, ListenV1UtteranceEnd)]
    assert len(ends) == 2 and abs(ends[0].last_word_end - alt.words[-1].end) < 0.05
    assert got.index(spoken[0]) < got.index(ends[0]) < got.index(spoken[1]) < got.index(ends[1])
    meta = got[-1]
    assert meta.channels == 1 and abs(meta.duration - ((len(puppy) + len(trim_tail(puppy))) / 32000 + 3.3)) < 0.05
    conn = dg.connections[0]
    assert [c["type"] for c in conn.control] == ["KeepAlive", "Finalize", "CloseStream"]
    assert "closed_after_closestream" in conn.events and dg.finals == script


async def test_deepgram_refuses_bad_wiring():
    with FakeDeepgram() as dg:
        with pytest.raises(ApiError) as info:
            async with dg_client(dg, key="wrong-key").listen.v1.connect(**DG_QUERY):
                pass
        assert info.value.status_code == 401
        url = f"{dg.ws_url}/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000"
        status, headers, body = await handshake_status(url, {"Authorization": f"Bearer {DG_KEY}"})
        assert status == 401 and json.loads(body)["err_code"] == "INVALID_AUTH" and headers["dg-request-id"]
        bad = {
            "model=nova-9": 400,
            "encoding=mp3": 400,
            "sample_rate=abc": 400,
            "endpointing=soon": 400,
            "interim_results=yes": 400,
            "utterance_end_ms=-5": 400,
            "endpoint=300": 400,
            "keywords=dog:2": 400,
        }
        for change, expected in bad.items():
            query = dict(DG_QUERY)
            key, value = change.split("=")
            query[key] = value
            url = f"{dg.ws_url}/v1/listen?" + "&".join(f"{k}={v}" for k, v in query.items())
            status, headers, body = await handshake_status(url, {"Authorization": f"Token {DG_KEY}"})
            assert status == expected, change
            assert json.loads(body)["err_msg"] == headers["dg-error"]
        no_rate = f"{dg.ws_url}/v1/listen?model=nova-3&encoding=linear16"
        assert (await handshake_status(no_rate, {"Authorization": f"Token {DG_KEY}"}))[0] == 400
        assert (await handshake_status(f"{dg.ws_url}/v2/listen?model=nova-3"))[0] == 404
        dg.reject_next(503)
        with pytest.raises(ApiError) as info:
            async with dg_client(dg).listen.v1.connect(**DG_QUERY):
                pass
        assert info.value.status_code == 503
        statuses = [r.status for r in dg.requests]
        assert statuses[0] == 401 and statuses[-1] == 503 and not dg.connections


async def test_deepgram_drop_after_aborts_mid_utterance(puppy):
    with FakeDeepgram(transcripts=["first try", "second try"]) as dg:
        dg.drop_after(1.2)
        errors: list = []
        async with dg_client(dg).listen.v1.connect(**DG_QUERY) as connection:
            connection.on(EventType.ERROR, lambda e: errors.append(e))
            listener = asyncio.create_task(connection.start_listening())
            with pytest.raises(websockets.ConnectionClosed) as info:
                await send_chunks(connection, silence(0.5) + puppy + silence(1.0))
                for _ in range(100):  # a busy machine may notice the abort only some sends later
                    await asyncio.sleep(0.1)
                    await send_chunks(connection, silence(0.02))
            await asyncio.wait_for(listener, 5)
        assert info.value.rcvd is None  # no close frame: the TCP connection was aborted
        first = dg.connections[0]
        assert any(e.startswith("closed_by_fault") for e in first.events)
        assert 1.2 <= first.audio_seconds < 1.3 and not first.finals  # cut before the end of speech
        # The fault was for one connection only: the next one transcribes normally.
        async with dg_client(dg).listen.v1.connect(**DG_QUERY) as connection:
            listener = asyncio.create_task(connection.start_listening())
            await send_chunks(connection, puppy + silence(0.6))
            assert dg.wait_until(lambda: dg.connections[1].finals, 5)
            await connection.send_close_stream()
            await asyncio.wait_for(listener, 5)
        assert dg.finals == ["first try"]  # the dropped connection never reached the end of speech


async def test_deepgram_closes_idle_stream_net0001():
    with FakeDeepgram() as dg:
        dg.idle_timeout = 0.5
        url = f"{dg.ws_url}/v1/listen?" + "&".join(f"{k}={v}" for k, v in DG_QUERY.items())
        async with websockets.connect(url, additional_headers={"Authorization": f"Token {DG_KEY}"}) as ws:
            await ws.send("not json")
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert error["type"] == "Error" and error["variant"] == "SchemaError"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd.code == 1011 and "net0001" in info.value.rcvd.reason
        assert "closed_idle:NET-0001" in dg.connections[0].events


# --- ElevenLabs -----------------------------------------------------------------------------------


def el_url(fake: FakeElevenLabs, endpoint: str = "multi-stream-input", voice: str = VOICE, **query) -> str:
    params = {"model_id": "eleven_flash_v2_5", "output_format": "pcm_16000", "auto_mode": "true", **query}
    return f"{fake.ws_url}/v1/text-to-speech/{voice}/{endpoint}?" + "&".join(
        f"{k}={v}" for k, v in params.items() if v is not None
    )


async def collect(ws, until_final_of: set[str]) -> dict[str, dict]:
    """Audio and alignment per context until each context in `until_final_of` sent isFinal."""
    out: dict[str, dict] = {}
    while until_final_of:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        ctx = out.setdefault(message.get("contextId"), {"pcm": b"", "chars": [], "final": False, "starts": []})
        if message.get("isFinal"):
            ctx["final"] = True
            until_final_of.discard(message.get("contextId"))
            continue
        ctx["pcm"] += base64.b64decode(message["audio"])
        if message["alignment"]:
            ctx["chars"] += message["alignment"]["chars"]
            ctx["starts"].append(message["alignment"]["charStartTimesMs"])
    return out


async def test_elevenlabs_through_pipecat():
    """Pipecat's ElevenLabsTTSService gets real speech, alignment-driven word timing and isFinal."""
    text = "Sure, how about Biscuit? It is short and friendly."
    with FakeElevenLabs() as el:
        tts = ElevenLabsTTSService(
            api_key=EL_KEY, url=el.ws_url, sample_rate=16000, settings=ElevenLabsTTSService.Settings(voice=VOICE)
        )
        down, up = await run_test(
            tts,
            frames_to_send=[TTSSpeakFrame(text), SleepFrame(3.0)],
            pipeline_params=PipelineParams(audio_out_sample_rate=16000),
            start_timeout=10,
        )
        audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
        assert audio == cached_piper_pcm(text, 16000)  # Piper varies run to run: the fake's cache is the truth
        assert any(isinstance(f, TTSStoppedFrame) for f in down)
        conn = el.connections[0]
        assert conn.query["model_id"] == "eleven_flash_v2_5" and conn.query["output_format"] == "pcm_16000"
        assert conn.headers["xi-api-key"] == EL_KEY
        ctx = conn.contexts[0]
        assert ctx.text.strip() == text and ctx.final_sent and ctx.flushes == 1
        assert "".join(ctx.alignment_chars).strip() == text
        first = conn.messages[0]
        assert first["text"] == " " and first["context_id"] == ctx.context_id


async def test_elevenlabs_multi_context_protocol():
    text_a = "Hello there, this is the first context speaking. "
    text_b = "And this one is interrupted before it ever finishes talking. "
    with FakeElevenLabs(chunk_ms=200) as el:
        async with websockets.connect(
            el_url(el), additional_headers={"xi-api-key": EL_KEY}, max_size=16 * 1024 * 1024
        ) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "a", "voice_settings": {"stability": 0.5}}))
            await ws.send(json.dumps({"text": text_a, "context_id": "a"}))
            await ws.send(json.dumps({"text": ""}))  # keepalive
            await ws.send(json.dumps({"context_id": "a", "flush": True}))
            await ws.send(json.dumps({"context_id": "a", "close_context": True}))
            # Context b: opened, text sent, then closed without a flush (an interruption).
            await ws.send(json.dumps({"text": " ", "context_id": "b"}))
            await ws.send(json.dumps({"text": text_b, "context_id": "b"}))
            await ws.send(json.dumps({"context_id": "b", "close_context": True}))
            got = await collect(ws, {"a", "b"})
            await ws.send(json.dumps({"close_socket": True}))
            with pytest.raises(websockets.ConnectionClosedOK):
                await asyncio.wait_for(ws.recv(), 5)
        # close_socket right after a flush: the flushed text is voiced before the socket closes.
        async with websockets.connect(el_url(el), additional_headers={"xi-api-key": EL_KEY}) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "d"}))
            await ws.send(json.dumps({"text": "Flushed, then the socket closes. ", "context_id": "d", "flush": True}))
            await ws.send(json.dumps({"close_socket": True}))
            flushed, tail = b"", []
            with pytest.raises(websockets.ConnectionClosedOK):
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    flushed += base64.b64decode(message.get("audio") or "")
                    tail.append(message)
        assert flushed == cached_piper_pcm("Flushed, then the socket closes.", 16000)
        assert tail[-1] == {"isFinal": True, "contextId": "d"}
    a = got["a"]
    assert a["final"] and a["pcm"] == cached_piper_pcm(text_a.strip(), 16000)
    assert "".join(a["chars"]) == text_a
    assert all(s == sorted(s) and s[0] >= 0 and s[-1] <= 200 for s in a["starts"])  # relative to each chunk
    assert got["b"]["final"] and len(got["b"]["pcm"]) < len(a["pcm"])  # cut off, not voiced to the end
    assert el.texts("a") == text_a and el.texts("b") == text_b
    assert "cancelled_on_close" in el.connections[0].contexts[1].events
    assert "closed_by_close_socket" in el.connections[0].events
    assert abs(el.connections[0].audio_seconds - (len(a["pcm"]) + len(got["b"]["pcm"])) / 32000) < 1e-6
    assert abs(el.audio_seconds_sent - el.connections[0].audio_seconds - len(flushed) / 32000) < 1e-6


async def test_elevenlabs_refuses_bad_wiring():
    with FakeElevenLabs() as el:
        good = {"xi-api-key": EL_KEY}
        status, _, body = await handshake_status(el_url(el), {"xi-api-key": "wrong"})
        assert status == 401 and json.loads(body)["detail"]["status"] == "invalid_api_key"
        assert (await handshake_status(el_url(el, model_id="eleven_flash_v9"), good))[0] == 400
        assert (await handshake_status(el_url(el, model_id="eleven_v3"), good))[0] == 403
        assert (await handshake_status(el_url(el, voice="no-such-voice"), good))[0] == 404
        assert (await handshake_status(el_url(el, output_format="mp3_44100_128"), good))[0] == 400
        assert (await handshake_status(el_url(el, output_format="pcm_12345"), good))[0] == 400
        assert (await handshake_status(el_url(el, model_id="eleven_multilingual_v2", language_code="en"), good))[
            0
        ] == 400
        assert (await handshake_status(el_url(el, auto_mode="maybe"), good))[0] == 400
        assert (await handshake_status(f"{el.ws_url}/v1/text-to-speech/{VOICE}/stream", good))[0] == 404
        el.reject_next(429)
        assert (await handshake_status(el_url(el), good))[0] == 429
        # In-socket policy violations close with 1008 and ElevenLabs' error message first.
        async with websockets.connect(el_url(el), additional_headers=good) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "a", "voice_settings": {"speed": 1.0}}))
            await ws.send(json.dumps({"text": "Hi. ", "context_id": "a", "voice_settings": {"speed": 1.1}}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert error["code"] == 1008 and "voice_settings" in error["message"]
            with pytest.raises(websockets.ConnectionClosedError) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1008
        async with websockets.connect(el_url(el), additional_headers=good) as ws:
            for i in range(6):
                await ws.send(json.dumps({"text": " ", "context_id": f"c{i}"}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert error["error"] == "max_active_conversations"
        assert not el.audio_seconds_sent


async def test_elevenlabs_fail_after_audio_aborts_mid_context():
    text = "This reply is long enough to be cut in the middle by the scripted failure of the fake server. "
    with FakeElevenLabs(chunk_ms=100, first_audio_delay=0.3) as el:
        el.fail_after_audio(0.5)
        async with websockets.connect(el_url(el), additional_headers={"xi-api-key": EL_KEY}) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "x"}))
            start = asyncio.get_running_loop().time()
            await ws.send(json.dumps({"text": text, "context_id": "x", "flush": True}))
            pcm, first_audio = b"", None
            with pytest.raises(websockets.ConnectionClosedError) as info:
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    first_audio = first_audio or asyncio.get_running_loop().time()
                    pcm += base64.b64decode(message["audio"])
        assert info.value.rcvd is None  # aborted: no close frame
        assert first_audio - start >= 0.3
        assert 0.5 <= len(pcm) / 32000 < 0.61
        assert any(e.startswith("closed_by_fault") for e in el.connections[0].events)
        # One failure only: the next context on a new connection is voiced whole.
        async with websockets.connect(el_url(el), additional_headers={"xi-api-key": EL_KEY}) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "y"}))
            await ws.send(json.dumps({"text": "Short one. ", "context_id": "y", "flush": True}))
            await ws.send(json.dumps({"context_id": "y", "close_context": True}))
            assert (await collect(ws, {"y"}))["y"]["final"]


async def test_elevenlabs_single_context_stream_input():
    """stream-input: key in the first message (no header), ulaw output, "" ends the stream."""
    with FakeElevenLabs() as el:
        url = el_url(el, "stream-input", output_format="ulaw_8000", auto_mode="false")
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"text": " ", "xi_api_key": EL_KEY}))
            await ws.send(json.dumps({"text": "Short and sweet. "}))
            await ws.send(json.dumps({"text": ""}))
            audio, finals = b"", 0
            with pytest.raises(websockets.ConnectionClosedOK):
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if message.get("isFinal"):
                        finals += 1
                    elif message.get("audio"):
                        audio += base64.b64decode(message["audio"])
        pcm = np.frombuffer(cached_piper_pcm("Short and sweet.", 8000), "<i2").astype(np.float64)
        decoded = g711_decode(audio, "mulaw").astype(np.float64)  # mu-law is 1 byte per sample
        assert finals == 1 and len(decoded) == len(pcm) and np.corrcoef(pcm, decoded)[0, 1] > 0.999
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"text": " ", "xi_api_key": "wrong"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["error"] == "invalid_api_key"
