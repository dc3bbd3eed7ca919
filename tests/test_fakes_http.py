"""Self-tests of the HTTP fake vendors, driven by the real clients: the anthropic SDK against FakeAnthropic, and
httpx (as our PlayHT service would) against FakePlayHT. If these pass, a test that wires a client wrongly (key,
headers, path, parameters) fails against the fakes the way it would against the vendor."""

from __future__ import annotations

import asyncio
import io
import json
import time
import warnings
import wave

import anthropic
import httpx
import numpy as np
import pytest

from fakes.anthropic import FakeAnthropic, default_reply, split_tokens
from fakes.playht import FakePlayHT, pcm_to_mulaw, speech_pcm

KEY = "test-anthropic-key"
MODEL = "claude-haiku-4-5"
SYSTEM = "You are Atlas, a warm and concise voice assistant. Keep replies short and friendly. " * 8
USER = "Hi Atlas, can you suggest a good name for my new puppy?"


# ---- Anthropic -------------------------------------------------------------------------------------------


@pytest.fixture
def fake():
    with FakeAnthropic() as server:
        yield server


@pytest.fixture
async def client(fake):
    c = anthropic.AsyncAnthropic(api_key=KEY, base_url=fake.http_url, max_retries=0)
    yield c
    await c.close()


def _messages(text: str = USER) -> list[dict]:
    return [{"role": "user", "content": text}]


async def _collect(stream) -> tuple[list, str]:
    events, text = [], ""
    async for event in stream:
        events.append(event)
        if event.type == "content_block_delta":
            text += event.delta.text
    return events, text


async def test_stream_like_pipecat_assembles_reply_and_reports_usage(fake, client):
    stream = await client.beta.messages.create(  # the call shape Pipecat's AnthropicLLMService makes
        model=MODEL,
        max_tokens=512,
        stream=True,
        messages=_messages(),
        tools=[],
        system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        thinking={"type": "disabled"},
        betas=["interleaved-thinking-2025-05-14"],
        extra_body={"temperature": 0.7},
    )
    events, text = await _collect(stream)

    expected = default_reply({"messages": _messages()})
    assert text == expected and "good name for my new puppy" in text
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert types.count("content_block_delta") == len(split_tokens(expected)) > 5
    start, delta = events[0].message, events[-2]
    assert start.id.startswith("msg_") and start.role == "assistant" and start.content == []
    assert start.model == "claude-haiku-4-5-20251001"
    assert start.usage.input_tokens > 0 and start.usage.cache_creation_input_tokens > 0
    assert start.usage.cache_read_input_tokens == 0
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == len(split_tokens(expected))

    rec = fake.requests[-1]
    assert rec.path == "/v1/messages" and rec.query == {"beta": "true"}
    assert rec.headers["x-api-key"] == KEY and rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert rec.body["temperature"] == 0.7 and rec.body["thinking"] == {"type": "disabled"}
    # The fake notes the stream complete after its last write, which the client may have read first.
    for _ in range(100):
        if rec.events:
            break
        await asyncio.sleep(0.02)
    assert rec.events == ["completed"] and rec.deltas_sent == len(split_tokens(expected))
    assert fake.completed == 1 and fake.status_counts == {200: 1}


async def test_prompt_cache_is_created_then_read(fake, client):
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    first = await client.messages.create(model=MODEL, max_tokens=256, system=system, messages=_messages())
    stream = await client.messages.create(model=MODEL, max_tokens=256, system=system, messages=_messages(), stream=True)
    events, _ = await _collect(stream)
    second = events[0].message.usage

    assert first.usage.cache_creation_input_tokens > 100 and first.usage.cache_read_input_tokens == 0
    assert second.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == 0
    assert second.input_tokens == first.usage.input_tokens  # the uncached rest: the same user turn
    assert first.content[0].text == default_reply({"messages": _messages()})

    # A different system prompt is a different prefix; no cache_control means no caching at all.
    other = await client.messages.create(
        model=MODEL, max_tokens=256, messages=_messages(), system=[{**system[0], "text": SYSTEM + " Be brief."}]
    )
    plain = await client.messages.create(model=MODEL, max_tokens=256, system=SYSTEM, messages=_messages())
    assert other.usage.cache_read_input_tokens == 0 and other.usage.cache_creation_input_tokens > 0
    assert plain.usage.cache_read_input_tokens == plain.usage.cache_creation_input_tokens == 0
    assert plain.usage.input_tokens > first.usage.cache_creation_input_tokens


async def test_max_tokens_truncates_and_pacing_is_applied(client):
    stream = await client.messages.create(model=MODEL, max_tokens=4, stream=True, messages=_messages())
    events, text = await _collect(stream)
    assert text == "".join(split_tokens(default_reply({"messages": _messages()}))[:4])
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 4

    with FakeAnthropic(
        first_token_delay=0.2, tokens_per_second=100, reply=lambda body: "one two three four five"
    ) as paced:
        c = anthropic.AsyncAnthropic(api_key=KEY, base_url=paced.http_url, max_retries=0)
        t0 = time.monotonic()
        stream = await c.messages.create(model="claude-opus-4-5", max_tokens=64, stream=True, messages=_messages())
        headers_at = time.monotonic() - t0
        _, text = await _collect(stream)
        assert text == "one two three four five"
        assert headers_at >= 0.19 and time.monotonic() - t0 >= 0.2 + 4 / 100
        await c.close()


async def test_wrong_key_is_an_authentication_error(fake):
    c = anthropic.AsyncAnthropic(api_key="sk-wrong", base_url=fake.http_url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        await c.messages.create(model=MODEL, max_tokens=64, messages=_messages())
    await c.close()
    assert err.value.status_code == 401
    assert err.value.body["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}
    assert err.value.request_id and err.value.request_id.startswith("req_")


async def test_raw_http_wiring_mistakes_get_the_apis_errors(fake):
    body = {"model": MODEL, "max_tokens": 64, "messages": _messages()}
    good = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(base_url=fake.http_url) as http:
        r = await http.post("/v1/messages", json=body, headers={"x-api-key": KEY})
        assert r.status_code == 400 and r.headers["request-id"].startswith("req_")
        assert r.json()["type"] == "error"
        assert r.json()["error"] == {
            "type": "invalid_request_error",
            "message": "anthropic-version: header is required",
        }
        r = await http.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await http.post("/v1/message", json=body, headers=good)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = await http.post("/v1/messages", json=body, headers={**good, "anthropic-beta": "interleaved-thinking"})
        assert r.status_code == 400 and "anthropic-beta" in r.json()["error"]["message"]
        r = await http.post("/v1/messages", content=b"{not json", headers={**good, "content-type": "application/json"})
        assert r.status_code == 400

        bad_bodies = {
            "betas": {**body, "betas": ["interleaved-thinking-2025-05-14"]},  # belongs in the header
            "max_tokens": {k: v for k, v in body.items() if k != "max_tokens"},
            "max_tokens: Input": {**body, "max_tokens": 0},
            "messages: at least one": {**body, "messages": []},
            "messages.0.role": {**body, "messages": [{"role": "system", "content": "hi"}]},
            "messages.0.content.0": {**body, "messages": [{"role": "user", "content": [{"type": "txt"}]}]},
            "temperature": {**body, "temperature": 1.5},
            "system.0.cache_control.type": {
                **body,
                "system": [{"type": "text", "text": "x", "cache_control": {"type": "persistent"}}],
            },
            "A maximum of 4 blocks": {
                **body,
                "system": [{"type": "text", "text": f"s{i}", "cache_control": {"type": "ephemeral"}} for i in range(5)],
            },
            "max_tokens: 100000 > 64000": {**body, "max_tokens": 100_000},
            "thinking.type": {**body, "thinking": {"type": "on"}},
        }
        for needle, bad in bad_bodies.items():
            r = await http.post("/v1/messages", json=bad, headers=good)
            assert r.status_code == 400, needle
            assert r.json()["error"]["type"] == "invalid_request_error" and needle in r.json()["error"]["message"]
        r = await http.post("/v1/messages", json=body, headers=good)
        assert r.status_code == 200 and r.json()["type"] == "message" and r.headers["request-id"]
    assert fake.completed == 1


async def test_unknown_model_is_not_found(client):
    with pytest.raises(anthropic.NotFoundError) as err:
        await client.messages.create(model="claude-nonexistent-9", max_tokens=64, messages=_messages())
    assert err.value.status_code == 404
    assert err.value.body["error"] == {"type": "not_found_error", "message": "model: claude-nonexistent-9"}
    for model in (
        "claude-haiku-4-5-20251001",
        "claude-sonnet-4-5",
        "claude-3-haiku-20240307",
        "claude-3-5-haiku-latest",
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the SDK warns about retiring models
            msg = await client.messages.create(model=model, max_tokens=64, messages=_messages())
        assert msg.stop_reason == "end_turn"


async def test_overloaded_and_rate_limited(fake, client):
    fake.fail_next(529)
    with pytest.raises(anthropic.APIStatusError) as err:
        await client.messages.create(model=MODEL, max_tokens=64, messages=_messages(), stream=True)
    assert err.value.status_code == 529
    assert isinstance(err.value, getattr(anthropic, "OverloadedError", anthropic.InternalServerError))
    assert err.value.body["error"]["type"] == "overloaded_error"

    fake.fail_next(429, retry_after=1.5)
    with pytest.raises(anthropic.RateLimitError) as err:
        await client.messages.create(model=MODEL, max_tokens=64, messages=_messages())
    assert err.value.response.headers["retry-after"] == "1.5"
    assert err.value.body["error"]["type"] == "rate_limit_error"

    fake.fail_next(500)
    with pytest.raises(anthropic.InternalServerError) as err:
        await client.messages.create(model=MODEL, max_tokens=64, messages=_messages())
    assert err.value.body["error"]["type"] == "api_error"

    # The SDK's own retry honours retry-after and then gets through; fail_always holds until cleared.
    retrying = client.with_options(max_retries=2)
    fake.fail_next(529, times=2, retry_after=0.05)
    msg = await retrying.messages.create(model=MODEL, max_tokens=64, messages=_messages())
    assert msg.content[0].text
    fake.fail_always(529)
    for _ in range(2):
        with pytest.raises(anthropic.APIStatusError):
            await client.messages.create(model=MODEL, max_tokens=64, messages=_messages())
    fake.clear_faults()
    await client.messages.create(model=MODEL, max_tokens=64, messages=_messages())
    assert fake.status_counts == {529: 5, 429: 1, 500: 1, 200: 2}


async def test_stalled_stream(fake, client):
    fake.stall_next(0.6)
    t0 = time.monotonic()
    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=_messages(), stream=True)
    arrivals = []
    async for event in stream:
        arrivals.append((event.type, time.monotonic() - t0))
    assert arrivals[0][0] == "message_start" and arrivals[0][1] < 0.3
    assert arrivals[1][0] == "content_block_start" and arrivals[1][1] >= 0.55
    assert arrivals[-1][0] == "message_stop"

    # A client read timeout shorter than the stall fails the stream.
    fake.stall_next(2.0)
    impatient = client.with_options(timeout=0.3)
    stream = await impatient.messages.create(model=MODEL, max_tokens=64, messages=_messages(), stream=True)
    with pytest.raises(Exception) as err:
        async for _ in stream:
            pass
    assert "timeout" in type(err.value).__name__.lower() or "timed out" in str(err.value).lower()
    assert fake.wait_until(lambda: fake.disconnects, 1.0)


async def test_error_event_mid_stream(fake, client):
    fake.error_mid_stream_next(after_deltas=3)
    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=_messages(), stream=True)
    deltas = []
    with pytest.raises(anthropic.APIStatusError) as err:
        async for event in stream:
            if event.type == "content_block_delta":
                deltas.append(event.delta.text)
    assert len(deltas) == 3
    assert err.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    rec = fake.requests[-1]
    assert rec.fault == "error_mid_stream" and "error_event:overloaded_error" in rec.events
    assert fake.completed == 0


async def test_closing_the_stream_early_is_seen_as_a_disconnect():
    with FakeAnthropic(tokens_per_second=20, reply=lambda body: "word " * 60) as paced:
        c = anthropic.AsyncAnthropic(api_key=KEY, base_url=paced.http_url, max_retries=0)
        stream = await c.messages.create(model=MODEL, max_tokens=256, messages=_messages(), stream=True)
        seen = 0
        async for event in stream:
            if event.type == "content_block_delta":
                seen += 1
                if seen == 3:
                    break
        closed_at = time.monotonic()
        await stream.close()
        assert paced.wait_until(lambda: paced.disconnects, 2.0)
        rec = paced.disconnects[0]
        assert rec.disconnected_at - closed_at < 0.25
        assert 3 <= rec.deltas_sent < 10 and f"deltas_sent:{rec.deltas_sent}" in rec.events
        assert paced.completed == 0
        await c.close()


# ---- PlayHT ----------------------------------------------------------------------------------------------

VOICE = "s3://voice-cloning-zero-shot/d9ff78ba-d016-47f6-b0ef-dd630f59414e/female-cs/manifest.json"
HEADERS = {"Authorization": "Bearer test-playht-key", "X-User-ID": "test-playht-user", "Accept": "audio/mpeg"}
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def playht_server():
    with FakePlayHT() as server:
        yield server


@pytest.fixture
def playht(playht_server):
    playht_server.clear_faults()
    playht_server.first_byte_delay = 0.0
    yield playht_server
    playht_server.clear_faults()


async def _tts(fake: FakePlayHT, headers: dict | None = None, **body) -> tuple[httpx.Response, bytes, int]:
    """POST to the stream endpoint; returns (response, body bytes, chunk count)."""
    payload = {"text": TEXT, "voice": VOICE, **body}
    async with httpx.AsyncClient(base_url=fake.http_url, timeout=30) as http:
        async with http.stream(
            "POST", "/api/v2/tts/stream", json=payload, headers=HEADERS if headers is None else headers
        ) as r:
            chunks = [c async for c in r.aiter_raw()]
    return r, b"".join(chunks), len(chunks)


async def test_playht_raw_pcm_streams_real_speech(playht):
    r, audio, chunks = await _tts(
        playht,
        output_format="raw",
        sample_rate=16000,
        speed=1.0,
        quality="draft",
        voice_engine="Play3.0-mini",
        seed=7,
        temperature=0.5,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers.get("transfer-encoding") == "chunked" and chunks >= 5
    assert audio == speech_pcm(TEXT, 16000)
    seconds = len(audio) / 2 / 16000
    assert 1.5 < seconds < 5.0
    rms = np.sqrt(np.mean(np.frombuffer(audio, np.int16).astype(np.float64) ** 2))
    assert rms > 300  # speech, not silence
    rec = playht.requests[-1]
    assert rec.headers["x-user-id"] == "test-playht-user" and rec.body["seed"] == 7
    # The fake notes "completed" after its last write; the client may have read it all a moment before.
    deadline = time.monotonic() + 5
    while rec.events != ["accepted", "completed"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert rec.bytes_sent == len(audio) and rec.events == ["accepted", "completed"]
    assert playht.texts[-1] == TEXT

    r, faster, _ = await _tts(playht, output_format="raw", sample_rate=16000, speed=2.0)
    assert r.status_code == 200 and len(faster) < 0.7 * len(audio)


async def test_playht_wav_mulaw_and_defaults(playht):
    r, data, _ = await _tts(playht, output_format="wav", sample_rate=22050)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        frames = w.readframes(w.getnframes())
    assert frames == speech_pcm(TEXT, 22050) and len(data) == 44 + len(frames)

    r, data, _ = await _tts(playht, output_format="mulaw", sample_rate=8000)
    pcm = speech_pcm(TEXT, 8000)
    assert r.headers["content-type"] == "audio/basic" and data == pcm_to_mulaw(pcm) and len(data) == len(pcm) // 2

    r, data, _ = await _tts(playht)  # defaults: mp3 at 24 kHz
    assert r.headers["content-type"] == "audio/mpeg"
    assert data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3")


async def test_playht_mp3_decodes_to_the_spoken_text(playht):
    import av
    import soxr

    from fakes.base import whisper_transcribe

    r, data, chunks = await _tts(playht, output_format="mp3", sample_rate=44100)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg" and chunks >= 3
    with av.open(io.BytesIO(data), format="mp3") as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.codec.id == av.codec.Codec("mp3").id and stream.rate == 44100
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    expected = len(speech_pcm(TEXT, 44100)) / 2 / 44100
    assert abs(len(decoded) / 44100 - expected) < 0.15
    pcm16k = (np.clip(soxr.resample(decoded.astype(np.float32), 44100, 16000), -1, 1) * 32767).astype(np.int16)
    text, _ = whisper_transcribe(pcm16k.tobytes())
    words = set(text.lower().replace(".", "").replace(",", "").split())
    assert len(words & {"quick", "brown", "fox", "jumps", "lazy", "dog"}) >= 4, text


async def test_playht_auth_is_checked(playht):
    r, body, _ = await _tts(playht, headers={**HEADERS, "Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert json.loads(body)["error_id"] == "UNAUTHORIZED" and json.loads(body)["error_message"]
    r, _, _ = await _tts(playht, headers={**HEADERS, "Authorization": "test-playht-key"}, output_format="raw")
    assert r.status_code == 200  # the raw secret, as the docs' curl examples send it
    r, body, _ = await _tts(playht, headers={k: v for k, v in HEADERS.items() if k != "X-User-ID"})
    assert r.status_code == 401 and "X-USER-ID" in json.loads(body)["error_message"]
    r, body, _ = await _tts(playht, headers={**HEADERS, "X-User-ID": "someone-else"})
    assert r.status_code == 403 and json.loads(body)["error_id"] == "FORBIDDEN"
    r, _, _ = await _tts(playht, headers={k: v for k, v in HEADERS.items() if k != "Authorization"})
    assert r.status_code == 401


async def test_playht_bad_requests_are_400(playht):
    cases = {
        "voice": {"voice": "larry"},
        "text": {"text": "   "},
        "sample_rate": {"sample_rate": 4000},
        "output_format": {"output_format": "aac"},
        "speed": {"speed": 6},
        "quality": {"quality": "ultra"},
        "voice_engine": {"voice_engine": "PlayHT9"},
        "sampleRate": {"sampleRate": 16000},
        "at most 2000": {"text": "a" * 2001},
    }
    before = len(playht.texts)
    for needle, override in cases.items():
        r, body, _ = await _tts(playht, **override)
        err = json.loads(body)
        assert r.status_code == 400 and err["error_id"] == "INVALID_PARAMETERS", needle
        assert needle in err["error_message"], (needle, err)
    async with httpx.AsyncClient(base_url=playht.http_url) as http:
        r = await http.post("/api/v2/tts", json={"text": TEXT, "voice": VOICE}, headers=HEADERS)
        assert r.status_code == 404 and "error_message" in r.json()
        r = await http.post("/api/v2/tts/stream", content=b"text=hi", headers={**HEADERS, "content-type": "text/plain"})
        assert r.status_code == 415
    assert len(playht.texts) == before


async def test_playht_faults(playht):
    playht.cut_next_after(3000)
    received = 0
    with pytest.raises(httpx.RemoteProtocolError):
        async with httpx.AsyncClient(base_url=playht.http_url) as http:
            async with http.stream(
                "POST",
                "/api/v2/tts/stream",
                headers=HEADERS,
                json={"text": TEXT, "voice": VOICE, "output_format": "raw"},
            ) as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    received += len(chunk)
    assert received == 3000
    assert playht.requests[-1].events[-1] == "closed_by_fault" and playht.requests[-1].fault == "cut"

    playht.fail_next(503)
    playht.fail_next(429)
    r, body, _ = await _tts(playht)
    assert r.status_code == 503 and json.loads(body)["error"] == "Service Unavailable"
    r, body, _ = await _tts(playht)
    assert r.status_code == 429 and json.loads(body)["error_id"] == "RATE_LIMIT_EXCEEDED"
    r, body, _ = await _tts(playht, output_format="raw")
    assert r.status_code == 200 and len(body) == len(speech_pcm(TEXT, 24000))

    playht.first_byte_delay = 0.3
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=playht.http_url) as http:
        async with http.stream(
            "POST", "/api/v2/tts/stream", headers=HEADERS, json={"text": TEXT, "voice": VOICE, "output_format": "raw"}
        ) as r:
            first = None
            async for _ in r.aiter_raw():
                first = first or time.monotonic() - t0
    assert first >= 0.3
