"""Spoken conversations over /ws on the cloud providers, each reached through its real SDK or wire
protocol at a local fake (fakes/) that checks requests like the vendor does; then each fault.

The Atlas server runs as a subprocess, exactly as in production, with only the base URLs changed.
Claude's fallback is the real local LLM (llama.cpp, behind the recording proxy).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fakes.anthropic import default_reply
from fakes.base import whisper_transcribe
from tests.conftest import PLAYHT_VOICE, UTTERANCES, VOICE, WINDOW_TOPICS, cloud_env, reset_vendors
from tests.helpers import connected_client, running_server, wer, words

pytestmark = pytest.mark.timeout(900)


def heard(pcm: bytes, rate: int) -> str:
    """What the reply audio says, transcribed by the local Whisper (resampled to 16 kHz)."""
    import soxr

    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0
    audio = soxr.resample(audio, rate, 16000)
    return whisper_transcribe(np.clip(audio * 32767, -32768, 32767).astype(np.int16).tobytes())[0]


def errors(client) -> list[str]:
    return [e["code"] for e in client.events if e.get("type") == "error"]


def bot_said(client, since: int = 0) -> str:
    return " ".join(e["text"] for e in client.events[since:] if e.get("type") == "bot_transcript")


@pytest.fixture(scope="module")
def cloud_ws(vendors, llm_record, artifacts):
    with running_server(cloud_env(vendors, llm_record, "elevenlabs"), artifacts / "server_cloud.log") as base:
        yield base.replace("http://", "ws://") + "/ws"


@pytest.fixture(scope="module")
def playht_ws(vendors, llm_record, artifacts):
    with running_server(cloud_env(vendors, llm_record, "playht"), artifacts / "server_playht.log") as base:
        yield base.replace("http://", "ws://") + "/ws"


@pytest.fixture(autouse=True)
def fresh_vendors(vendors):
    reset_vendors(vendors)


async def test_cloud_conversation_deepgram_claude_elevenlabs(cloud_ws, vendors, speech):
    dg, claude, eleven = vendors["deepgram"], vendors["anthropic"], vendors["elevenlabs"]
    n_dg, n_claude, n_eleven = len(dg.connections), len(claude.requests), len(eleven.connections)
    client = await connected_client(cloud_ws)
    turns = []
    for name in ("puppy", "dinner"):
        mark = len(client.events)
        turn = await client.say(speech[name])
        await client.wait_reply_done(timeout=60)
        turns.append(turn)
        assert wer(UTTERANCES[name], turn.final_transcript) <= 0.2, turn.final_transcript
        assert 0.0 < turn.confidence <= 1.0
        partials = [e for e in client.events[mark:] if e["type"] == "partial_transcript"]
        assert partials and all(0.0 < p["confidence"] <= 1.0 for p in partials)
        # The reply is the fake Claude's, spoken by the fake ElevenLabs: transcribe it back.
        said = bot_said(client, mark)
        assert said.startswith("I heard you say"), said
    end = await client.stop()
    assert errors(client) == []
    assert end["metrics"]["turns"] == 2

    # Deepgram: one live stream with the documented query and auth, fed 16 kHz linear16.
    conn = dg.connections[n_dg]
    assert conn.headers["authorization"] == "Token test-deepgram-key"
    q = conn.query
    assert (q["model"], q["encoding"], q["sample_rate"], q["channels"]) == ("nova-3", "linear16", "16000", "1")
    assert (q["interim_results"], q["punctuate"], q["endpointing"], q["utterance_end_ms"]) == (
        "true",
        "true",
        "300",
        "1000",
    )
    assert conn.audio_seconds > 5

    # Claude: key, version, the Atlas prompt with prompt caching, max_tokens 300, streaming,
    # and the second request carries the first exchange.
    first, second = claude.requests[n_claude : n_claude + 2]
    assert first.headers["x-api-key"] == "test-anthropic-key" and first.headers["anthropic-version"]
    body = second.body
    assert body["model"] == "claude-haiku-4-5" and body["max_tokens"] == 300 and body["stream"] is True
    system = body["system"] if isinstance(body["system"], str) else " ".join(b["text"] for b in body["system"])
    assert system.startswith("You're Atlas, a warm and emotionally intelligent AI companion.")
    assert any(isinstance(b, dict) and b.get("cache_control") for b in body["system"]), body["system"]
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"], roles
    assert wer(UTTERANCES["dinner"], _text(body["messages"][-1])) <= 0.2

    # ElevenLabs: the multi-stream socket with our voice, model and the pipeline's PCM rate.
    el = eleven.connections[n_eleven]
    assert el.headers["xi-api-key"] == "test-elevenlabs-key"
    assert el.path == f"/v1/text-to-speech/{VOICE}/multi-stream-input"
    assert el.query["model_id"] == "eleven_flash_v2_5" and el.query["output_format"] == "pcm_22050"
    text = heard(bytes(client.reply_audio), client.out_rate)
    assert wer(bot_said(client), text) <= 0.3, (bot_said(client), text)


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(b.get("text", "") for b in content)


async def test_cloud_window_keeps_last_ten_messages(cloud_ws, vendors, speech):
    claude = vendors["anthropic"]
    claude.reply = lambda body: "Okay."
    n = len(claude.requests)
    client = await connected_client(cloud_ws)
    for i in range(len(WINDOW_TOPICS)):
        await client.say(speech[f"topic{i}"])
        await client.wait_reply_done(timeout=60, quiet=0.5)
    await client.stop()
    bodies = [r.body for r in claude.requests[n:] if r.status == 200]
    assert len(bodies) == len(WINDOW_TOPICS)
    sizes = [len(b["messages"]) for b in bodies]
    assert sizes == [1, 3, 5, 7, 9, 11, 11, 11, 11, 11, 11, 11], sizes  # 10 of history and the question
    last = bodies[-1]["messages"]
    assert last[0]["role"] == "user" and WINDOW_TOPICS[-1] in _text(last[-1]).lower()
    assert all(WINDOW_TOPICS[0] not in _text(m).lower() for m in last)


async def test_playht_conversation(playht_ws, vendors, speech):
    playht = vendors["playht"]
    n = len(playht.requests)
    client = await connected_client(playht_ws)
    turn = await client.say(speech["puppy"])
    await client.wait_reply_done(timeout=60)
    await client.stop()
    assert errors(client) == []
    assert turn.reply_bytes > client.out_rate
    req = playht.requests[n]
    assert req.headers["authorization"] == "Bearer test-playht-key"
    assert req.headers["x-user-id"] == "test-playht-user"
    assert req.body["voice"] == PLAYHT_VOICE and req.body["speed"] == 1.05
    assert req.body["output_format"] == "mp3" and req.body["sample_rate"] == 22050
    said = bot_said(client)
    assert wer(said, heard(bytes(client.reply_audio), client.out_rate)) <= 0.3


async def test_deepgram_drop_mid_utterance_loses_nothing(cloud_ws, vendors, speech):
    dg = vendors["deepgram"]
    n = len(dg.connections)
    dg.drop_after(1.5)  # the session's stream dies 1.5 s into its audio: mid-utterance
    client = await connected_client(cloud_ws)
    turn = await client.say(speech["story"])
    await client.wait_reply_done(timeout=60)
    await client.stop()
    assert errors(client) == ["STT_RECONNECTING"]  # once, and no generic PIPELINE_ERROR
    assert wer(UTTERANCES["story"], turn.final_transcript) <= 0.25, turn.final_transcript
    assert len(dg.connections) - n >= 2
    assert any(e.startswith("closed_by_fault") for e in dg.connections[n].events)
    assert dg.connections[n].finals == []  # the cut stream never finalized anything
    # The new stream got the audio of the cut utterance again (replayed), not just what followed.
    assert dg.connections[n + 1].audio_seconds >= 1.0


async def test_claude_overloaded_once_is_retried(cloud_ws, vendors, speech):
    claude = vendors["anthropic"]
    claude.fail_next(529, times=1)
    n = len(claude.requests)
    client = await connected_client(cloud_ws)
    await client.say(speech["dinner"])
    await client.wait_reply_done(timeout=60)
    await client.stop()
    assert errors(client) == []
    assert [r.status for r in claude.requests[n:]] == [529, 200]
    assert bot_said(client).startswith("I heard you say")


async def test_claude_overloaded_throughout_falls_back(cloud_ws, vendors, speech, llm_record):
    from tests.helpers import read_records

    claude = vendors["anthropic"]
    claude.fail_always(529)
    local_before = len(read_records(llm_record))
    n = len(claude.requests)
    client = await connected_client(cloud_ws)
    turn = await client.say(speech["dinner"])
    await client.wait_reply_done(timeout=120)
    await client.stop()
    assert "LLM_UNAVAILABLE" in errors(client)
    statuses = [r.status for r in claude.requests[n:]]
    assert statuses == [529, 529, 529], statuses  # the first try and two retries, then the fallback
    # The local LLM answered, and the answer was heard.
    assert len(read_records(llm_record)) > local_before
    assert turn.reply_bytes > client.out_rate
    said = bot_said(client)
    assert said and not said.startswith("I heard you say")


async def test_tts_failure_mid_reply_is_finished_by_piper(cloud_ws, vendors, speech):
    claude, eleven = vendors["anthropic"], vendors["elevenlabs"]
    # three sentences: a reply speaks at most ATLAS_REPLY_MAX_SENTENCES (3)
    claude.reply = lambda body: (
        "Puppies love short names, and Biscuit is a cheerful choice. Maple sounds warm and friendly to most "
        "people. Pepper is playful and easy to call across a park."
    )
    eleven.fail_after_audio(1.5)
    client = await connected_client(cloud_ws)
    turn = await client.say(speech["puppy"])
    await client.wait_reply_done(timeout=60)
    await client.stop()
    assert errors(client).count("TTS_FALLBACK") == 1
    # Every sentence was heard, once: ElevenLabs' part and Piper's part together make the whole reply. Judged
    # by most words of each sentence and the length: Whisper tiny mishears a word here and there ("park" as
    # "part"), and the word ElevenLabs was cut in the middle of is said again whole by Piper.
    reply = claude.reply({})
    text = heard(bytes(client.reply_audio), client.out_rate)
    said = set(words(text))
    for sentence in reply.split(". "):
        expected = words(sentence)
        assert sum(w in said for w in expected) >= 0.6 * len(expected), (sentence, text)
    assert len(words(text)) <= 1.25 * len(words(reply)), text  # nothing said twice
    assert wer(reply, text) <= 0.45, text
    assert turn.reply_bytes / (2 * client.out_rate) > 6  # seconds of reply audio


async def test_a_voice_that_stays_silent_is_replaced_by_piper(cloud_ws, vendors, speech):
    eleven = vendors["elevenlabs"]
    eleven.first_audio_delay = 6.0  # longer than Pipecat's 3 s quiet-context timeout
    try:
        client = await connected_client(cloud_ws)
        turn = await client.say(speech["dinner"])
        await client.wait_reply_done(timeout=60)
        await client.stop()
    finally:
        eleven.first_audio_delay = 0.0
    assert errors(client) == ["TTS_FALLBACK"]
    assert turn.reply_bytes > 2 * client.out_rate  # seconds of reply, not silence
    said = vendors["anthropic"].requests[-1].text_sent
    text = heard(bytes(client.reply_audio), client.out_rate)
    assert wer(said, text) <= 0.3, (said, text)  # heard once, in full: no late ElevenLabs audio doubled it


async def test_interruption_cancels_the_claude_stream(cloud_ws, vendors, speech):
    claude = vendors["anthropic"]
    claude.reply = lambda body: " ".join(["Once upon a time there was a small dragon who could not fly."] * 6)
    claude.tokens_per_second = 6  # a long, slow stream: still writing when the user cuts in
    n = len(claude.requests)
    client = await connected_client(cloud_ws)
    turn = await client.say(speech["story"])
    await client.wait_for(lambda e: e.get("type") == "audio_chunk", timeout=30)
    claude.tokens_per_second = 0
    claude.reply = default_reply
    await client.send_silence(0.5)
    await client.say(speech["cats"])
    await client.wait_reply_done(timeout=60)
    await client.stop()
    assert turn.flushed or any(e["type"] == "audio_flush" for e in client.events)
    first = claude.requests[n]
    assert "client_disconnected" in first.events, first.events


async def test_a_session_stopped_while_deepgram_is_still_connecting_still_says_goodbye(cloud_ws, vendors):
    """The STT's slow handshake holds the pipeline's start; a session_stop then still gets its session_end
    before the socket closes (the transport's output never ran, so the door says it)."""
    import json

    import websockets

    vendors["deepgram"].stall_next(8.0)
    async with websockets.connect(cloud_ws) as ws:
        await ws.send(json.dumps({"type": "session_start", "userId": "u1", "conversationId": "c1"}))
        got = []
        while not got or got[-1].get("type") != "session_started":
            got.append(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "session_stop"}))
        while got[-1].get("type") != "session_end":
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        assert got[-1]["reason"] == "client_stop"
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 20)
        assert ws.close_code == 1000
