"""The two clients a user touches: `atlas-voice talk` and the browser page (headless Chromium)."""

from __future__ import annotations

import re
import subprocess
import sys
import wave

import numpy as np
import pytest

from tests.helpers import REPO, chromium_with_microphone, read_wav, running_server, wer, words, write_wav


def test_talk_cli_prints_events_latency_and_saves_the_reply(atlas_ws, speech, tmp_path):
    out = tmp_path / "reply.wav"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "talk",
            "--url",
            atlas_ws,
            "--wav",
            str(speech["puppy"]),
            "--wav",
            str(speech["dinner"]),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any('"type": "session_started"' in line for line in lines)
    assert any('"type": "final_transcript"' in line for line in lines)
    turns = [line for line in lines if line.startswith("turn ")]
    assert len(turns) == 2
    for line in turns:
        v2v = float(re.search(r"voice-to-voice ([\d.]+) ms", line).group(1))
        assert 100 < v2v < 30000
    assert re.search(r"voice-to-voice over 2 turns: p50 [\d.]+ ms, p95 [\d.]+ ms", proc.stdout)
    assert "server breakdown" in proc.stdout
    with wave.open(str(out)) as w:
        assert w.getframerate() == 22050 and w.getnframes() > 22050  # over a second of reply


@pytest.fixture(scope="module")
def default_server(artifacts):
    """`atlas-voice serve` exactly as the quick start runs it: no settings, its own llama.cpp."""
    with running_server({}, artifacts / "server_default.log") as base:
        yield base


def test_browser_page_hears_the_microphone_and_plays_the_reply(default_server, speech, artifacts, tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.conftest import UTTERANCES

    # Chromium's fake microphone loops this file: speech, then enough silence for the reply.
    pcm, rate = read_wav(speech["puppy"])
    mic = write_wav(
        tmp_path / "mic.wav", np.concatenate([np.zeros(rate // 2, np.int16), pcm, np.zeros(rate * 20, np.int16)]), rate
    )
    with sync_playwright() as p:
        browser = chromium_with_microphone(p, mic, "--autoplay-policy=no-user-gesture-required")
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(default_server + "/")
        page.click("#start")
        page.wait_for_function("window.atlas.finals.length > 0", timeout=60000)
        page.wait_for_function("window.atlas.audioSeconds > 1.0 && window.atlas.botText.length > 0", timeout=60000)
        state = page.evaluate(
            "({finals: atlas.finals, chunks: atlas.audioChunks, secs: atlas.audioSeconds,"
            " bot: atlas.botText, errors: atlas.errors})"
        )
        transcript_text = page.inner_text("#transcript")
        page.screenshot(path=str(artifacts / "browser.png"))
        page.click("#start")  # Stop: session_stop -> session_end
        page.wait_for_function("window.atlas.sessionEnd !== null", timeout=20000)
        browser.close()
    assert not errors and not state["errors"], (errors, state["errors"])
    # A pause after "Hi Atlas," may split the speech into two transcripts of one turn.
    assert wer(UTTERANCES["puppy"], " ".join(state["finals"])) <= 0.15, state["finals"]
    assert "puppy" in words(transcript_text)
    assert state["chunks"] > 10 and state["secs"] > 1.0
    assert words(state["bot"][0])[0] in words(transcript_text)
