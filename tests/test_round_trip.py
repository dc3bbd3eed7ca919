"""Spoken round trips over /ws on the real local engines (Whisper, llama.cpp, Piper)."""

from __future__ import annotations

import numpy as np
import pytest

from storage.sinks import SQLiteSink
from tests.helpers import connected_client, librivox_clips, recorded, wer, write_wav
from tests.recording_checks import check_recorded

STATUS_ORDER = ["listening", "transcribing", "thinking", "speaking", "listening"]


def statuses(events) -> list[str]:
    return [e["status"] for e in events if e.get("type") == "status"]


def contains_in_order(seq: list[str], wanted: list[str]) -> bool:
    it = iter(seq)
    return all(any(s == w for s in it) for w in wanted)


async def test_piper_speech_round_trip(atlas_ws, speech, artifacts):
    from tests.conftest import UTTERANCES

    client = await connected_client(atlas_ws)
    started = client.events[0]
    assert started["audioFormat"] == {"encoding": "pcm_s16le", "sampleRate": 22050, "channels": 1}
    turns = []
    for name in ("puppy", "dinner"):
        turn = await client.say(speech[name])
        await client.wait_reply_done(timeout=60)
        turns.append(turn)
        assert wer(UTTERANCES[name], turn.final_transcript) <= 0.15, turn.final_transcript
        assert 0.0 < turn.confidence <= 1.0
        assert turn.reply_bytes > client.out_rate  # more than half a second of reply audio
    end = await client.stop()

    # Sentence indexes count the replies' sentences from 0 across the session, never going back.
    indexes = [e["sentenceIndex"] for e in client.events if e.get("type") == "audio_chunk"]
    assert indexes[0] == 0 and indexes == sorted(indexes)
    assert turns[1].sentence_indexes[0] > turns[0].sentence_indexes[-1]

    assert contains_in_order(statuses(client.events), STATUS_ORDER + STATUS_ORDER[1:])
    # Partial transcripts come before the final one of the same turn.
    kinds = [e["type"] for e in client.events if e["type"].endswith("_transcript")]
    assert "partial_transcript" in kinds and kinds.index("partial_transcript") < kinds.index("final_transcript")

    assert end["type"] == "session_end" and end["sessionId"] == started["sessionId"]
    assert end["reason"] == "client_stop" and end["duration"] > 5
    m = end["metrics"]
    assert m["turns"] == 2
    assert m["sttDuration"] > 4.0  # seconds of user speech sent to STT (two ~2-3 s utterances)
    for key in ("sttLatency", "llmLatency", "ttsLatency", "totalLatency"):
        assert isinstance(m[key], float) and 0 < m[key] < 20000, (key, m[key])
    # The client's own voice-to-voice measure and the server's agree within network noise.
    client_v2v = np.mean([t.voice_to_voice_ms for t in turns])
    assert abs(client_v2v - m["totalLatency"]) < 400, (client_v2v, m["totalLatency"])

    # Recorded in the embedded SQLite store (no SUPABASE_URL): the same numbers, once.
    db = artifacts / "server.sqlite3"
    session, turn_rows = await recorded(SQLiteSink(db), end["sessionId"], len(turns))
    check_recorded(session, turn_rows, end, turns)
    assert (session["llm_provider"], session["tts_provider"], session["stt_provider"]) == ("openai", "piper", "whisper")
    assert session["user_id"] is None and session["client_user_id"] == client.user_id

    # What was sent as audio is the speech of what the bot said: transcribe it back.
    reply = np.frombuffer(bytes(client.reply_audio), np.int16)
    path = write_wav(artifacts / "round_trip_reply.wav", reply, client.out_rate)
    from faster_whisper import WhisperModel

    from services.local.models import whisper_model_dir

    model = WhisperModel(str(whisper_model_dir()), device="cpu", compute_type="int8")
    segments, _ = model.transcribe(str(path), language="en")
    heard = " ".join(s.text for s in segments)
    said = " ".join(e["text"] for e in client.events if e.get("type") == "bot_transcript")
    assert said and wer(said, heard) <= 0.25, (said, heard)


@pytest.mark.parametrize("clip", range(5))
async def test_real_recordings_round_trip(atlas_ws, clip):
    """Real human speech (LibriVox, Debian's pocketsphinx-testdata) is transcribed and answered."""
    path, reference = librivox_clips()[clip]
    client = await connected_client(atlas_ws)
    turn = await client.say(path)
    await client.wait_reply_done(timeout=60)
    end = await client.stop()
    assert wer(reference, turn.final_transcript) <= 0.35, (reference, turn.final_transcript)
    assert turn.reply_bytes > 0 and turn.sentence_indexes[0] == 0
    assert end["metrics"]["turns"] == 1
