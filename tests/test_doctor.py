"""`atlas-voice doctor`: a wrong key, a missing model, a busy port and a bad value each get a line saying what to
fix, against the vendors' fakes over real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from fakes.anthropic import FakeAnthropic
from fakes.deepgram import FakeDeepgram
from fakes.elevenlabs import FakeElevenLabs
from tests.helpers import REPO, free_port

VOICE = "21m00Tcm4TlvDq8EAJjs"


@pytest.fixture(scope="module")
def fakes():
    started = [FakeAnthropic().start(), FakeDeepgram().start(), FakeElevenLabs(voices={VOICE}).start()]
    yield started
    for fake in started:
        fake.stop()


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ATLAS_", "ANTHROPIC_", "DEEPGRAM_", "ELEVEN"))}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "doctor", *args],
        cwd=REPO,
        env={**clean, "ATLAS_PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def cloud(fakes, anthropic_key="test-anthropic-key", deepgram_key="test-deepgram-key") -> dict[str, str]:
    claude, dg, eleven = fakes
    return {
        "ANTHROPIC_API_KEY": anthropic_key,
        "ANTHROPIC_BASE_URL": claude.http_url,
        "DEEPGRAM_API_KEY": deepgram_key,
        "DEEPGRAM_BASE_URL": dg.ws_url,
        "ELEVENLABS_API_KEY": "test-elevenlabs-key",
        "ELEVENLABS_BASE_URL": eleven.ws_url,
        "ELEVENLABS_VOICE_ID": VOICE,
    }


def test_doctor_passes_a_good_cloud_setup_and_sends_nothing_billable(fakes):
    r = doctor(cloud(fakes))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok  Anthropic: key accepted, claude-haiku-4-5 available" in r.stdout
    assert "ok  Deepgram: key accepted" in r.stdout and "ok  ElevenLabs: key accepted" in r.stdout
    assert "all good" in r.stdout
    claude, dg, eleven = fakes
    assert not [q for q in claude.requests if q.path == "/v1/messages"]  # no billed request
    assert all(c.audio_seconds == 0 for c in dg.connections)


def test_doctor_names_a_wrong_key(fakes):
    r = doctor(cloud(fakes, anthropic_key="sk-wrong", deepgram_key="wrong"))
    assert r.returncode == 1
    assert "FAIL  Anthropic: ANTHROPIC_API_KEY was refused (401): check the key" in r.stdout, r.stdout
    assert "FAIL  Deepgram: DEEPGRAM_API_KEY was refused (401): check the key" in r.stdout
    assert "ok  ElevenLabs" in r.stdout and "2 problem(s) to fix" in r.stdout
    assert "sk-wrong" not in r.stdout + r.stderr  # never echoes a secret


def test_doctor_names_a_missing_model_a_busy_port_and_a_bad_value(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = doctor({"ATLAS_LLM_MODEL_PATH": str(tmp_path / "missing.gguf"), "ATLAS_PORT": str(port)})
    assert r.returncode == 1
    assert f"FAIL  local LLM model: ATLAS_LLM_MODEL_PATH={tmp_path / 'missing.gguf'} does not exist" in r.stdout
    assert f"FAIL  port 127.0.0.1:{port}: in use by another program" in r.stdout, r.stdout
    r = doctor({"ATLAS_PORT": "eighty"})
    assert r.returncode == 1 and "FAIL  settings: ATLAS_PORT: Input should be a valid integer" in r.stdout
