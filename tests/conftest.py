"""Fixtures: real engines everywhere. One local llama.cpp server (behind a recording proxy) and one
Atlas server per test session; utterances synthesized once by Piper."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, Speaker, free_port, running_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")

UTTERANCES = {
    "puppy": "Hi Atlas, can you suggest a good name for my new puppy?",
    "dinner": "What should I cook for dinner tonight?",
    "story": "Please tell me a long and detailed story about a brave little dragon who learns to fly.",
    "cats": "Wait, stop. Tell me about cats instead.",
}
VOICE = "21m00Tcm4TlvDq8EAJjs"
PLAYHT_VOICE = "s3://voice-cloning-zero-shot/d9ff78ba-d016-47f6-b0ef-dd630f59414e/female-cs/manifest.json"
WINDOW_TOPICS = [
    "apples",
    "rivers",
    "mountains",
    "violins",
    "gardens",
    "oceans",
    "bicycles",
    "libraries",
    "volcanoes",
    "penguins",
    "lanterns",
    "castles",
]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = REPO / "tests" / "artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def engines():
    """The process-wide local engines a pipeline needs without speech recognition: Piper, Silero (no Whisper)."""
    from services.local.engines import LocalEngines

    return LocalEngines.load(stt=False, smart_turn=False)


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("speech")
    speaker = Speaker(out)
    wavs = {name: speaker.say(name, text) for name, text in UTTERANCES.items()}
    for i, topic in enumerate(WINDOW_TOPICS):
        wavs[f"topic{i}"] = speaker.say(f"topic{i}", f"Say one short sentence about {topic}.")
    return wavs


@pytest.fixture(scope="session")
def llm_upstream(tmp_path_factory):
    """The real local LLM (llama.cpp server with the default, checksum-verified model)."""
    from config.settings import Settings
    from services.local.llama_server import LlamaServer
    from services.local.models import resolve_llm_path

    settings = Settings()
    server = LlamaServer(resolve_llm_path(settings.llm_model_path, settings.cache_dir), threads=2, slots=2)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.start())
    yield server.base_url.removesuffix("/v1")
    loop.run_until_complete(server.stop())
    loop.close()


@pytest.fixture(scope="session")
def llm_record(tmp_path_factory, llm_upstream) -> Path:
    """A recording proxy in front of the real LLM; returns the JSONL file of request bodies."""
    record = tmp_path_factory.mktemp("llm") / "requests.jsonl"
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "llm_recorder.py"),
            "--upstream",
            llm_upstream,
            "--port",
            str(port),
            "--record",
            str(record),
        ],
    )
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    record.with_suffix(".url").write_text(f"http://127.0.0.1:{port}/v1")
    yield record
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def atlas(llm_record, artifacts) -> str:
    """The Atlas server on the real local engines, its LLM reached through the recording proxy."""
    # Temperature 0: the same speech gets the same (long) reply every run, so tests are repeatable.
    env = {
        "ATLAS_LLM_URL": llm_record.with_suffix(".url").read_text(),
        "ATLAS_LLM_MODEL_NAME": "local",
        "ATLAS_LLM_TEMPERATURE": "0",
    }
    with running_server(env, artifacts / "server.log") as base:
        yield base


@pytest.fixture(scope="session")
def atlas_ws(atlas) -> str:
    return atlas.replace("http://", "ws://") + "/ws"


@pytest.fixture(scope="session")
def vendors():
    """The fake cloud vendors (fakes/), shared by every test that runs Atlas on the cloud providers."""
    from fakes.anthropic import FakeAnthropic
    from fakes.base import whisper_transcribe
    from fakes.deepgram import FakeDeepgram
    from fakes.elevenlabs import FakeElevenLabs
    from fakes.playht import FakePlayHT

    fakes = {
        "deepgram": FakeDeepgram().start(),
        "anthropic": FakeAnthropic().start(),
        "elevenlabs": FakeElevenLabs(voices={VOICE}).start(),
        "playht": FakePlayHT().start(),
    }
    # Load each fake's engines now (Piper, Whisper: seconds when cold), so the first test measures
    # the server, not a fake warming up.
    fakes["elevenlabs"].synthesize("Warming up.", 22050)
    fakes["playht"].warm_up()
    whisper_transcribe(bytes(32000))
    yield fakes
    for fake in fakes.values():
        fake.stop()


def reset_vendors(vendors) -> None:
    """The shared fakes as a test expects them: no scripted fault left, Claude's default reply at once."""
    from fakes.anthropic import default_reply

    for fake in vendors.values():
        fake.clear_faults()
    vendors["anthropic"].reply = default_reply
    vendors["anthropic"].tokens_per_second = 0
    vendors["anthropic"].first_token_delay = 0.0


def cloud_env(vendors, llm_record, tts: str) -> dict[str, str]:
    return {
        "DEEPGRAM_API_KEY": "test-deepgram-key",
        "DEEPGRAM_BASE_URL": vendors["deepgram"].ws_url,
        "ANTHROPIC_API_KEY": "test-anthropic-key",
        "ANTHROPIC_BASE_URL": vendors["anthropic"].http_url,
        "ELEVENLABS_API_KEY": "test-elevenlabs-key",
        "ELEVENLABS_BASE_URL": vendors["elevenlabs"].ws_url,
        "ELEVENLABS_VOICE_ID": VOICE,
        "PLAYHT_API_KEY": "test-playht-key",
        "PLAYHT_USER_ID": "test-playht-user",
        "PLAYHT_BASE_URL": vendors["playht"].http_url,
        "PLAYHT_OUTPUT_FORMAT": "mp3",
        "ATLAS_TTS": tts,
        # Claude's fallback: the real local LLM, through the recording proxy.
        "ATLAS_LLM_URL": llm_record.with_suffix(".url").read_text(),
        "ATLAS_LLM_MODEL_NAME": "local",
        "ATLAS_LLM_TEMPERATURE": "0",
    }


# --- test tiers -----------------------------------------------------------------------------------------
# `pytest -m "not slow"` is the inner loop (a few minutes): everything but the tests that start an Atlas
# server, the local LLM, a browser or a benchmark run. The full suite (.ci/run) runs both.
SLOW_FIXTURES = {
    "atlas",
    "atlas_ws",
    "llm_upstream",
    "llm_record",
    "vendors",
    "default_server",
    "auth_ws",
    "short_timeouts_ws",
    "doors",
    "limited",
    "secure",
    "unsigned",
    "phone_door",
    "cloud_ws",
    "playht_ws",
    "browser",
    "report",
}
SLOW_MODULES = {
    "test_bench",
    "test_bench_turns",
    "test_clients",
    "test_conversation",
    "test_faults_bench",
    "test_round_trip",
    "test_wheel",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (
            SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
            or item.module.__name__.split(".")[-1] in SLOW_MODULES
        ):
            item.add_marker(pytest.mark.slow)
