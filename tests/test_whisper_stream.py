"""The local Whisper streams (services/local/engines.py SharedWhisperSTTService): a sentence split at a pause
keeps its words, partials read a bounded window, the final comes from the partials' work.

Real models (Whisper tiny.en, Silero, Piper's voice for the speech); the audio goes through Silero at the
VAD stop the app would use, then through the service in a Pipecat pipeline, paced like a live caller.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pipecat.audio.vad.vad_analyzer import VADParams, VADState
from pipecat.frames.frames import (
    EndFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner

from tests.helpers import librivox_clips, read_wav, wer, words

SR = 16000
FRAME = SR // 50  # 20 ms


@pytest.fixture(scope="module")
def engines():
    from services.local.engines import LocalEngines

    return LocalEngines.load(stt=True, tts=False, smart_turn=False)


def speech(*parts: str | float) -> np.ndarray:
    """Piper's voice saying the text parts, with the pauses (seconds) between them, 0.3 s before, 1 s after."""
    from fakes.base import piper_pcm

    pieces = [np.zeros(int(0.3 * SR), np.int16)]
    for part in parts:
        if isinstance(part, str):
            pieces.append(np.frombuffer(piper_pcm(part, SR, same_every_run=True), np.int16))
        else:
            pieces.append(np.zeros(int(part * SR), np.int16))
    pieces.append(np.zeros(SR, np.int16))
    return np.concatenate(pieces)


class Heard(FrameProcessor):
    def __init__(self):
        super().__init__()
        self.finals: list[TranscriptionFrame] = []
        self.partials: list[str] = []
        self.stops = 0  # VAD stops sent

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            self.finals.append(frame)
        elif isinstance(frame, InterimTranscriptionFrame):
            self.partials.append(frame.text)
        await self.push_frame(frame, direction)


def vad_events(engines, audio: np.ndarray, stop_secs: float) -> list[str | None]:
    """Per 20 ms frame: "start", "stop" or None, from the app's Silero analyzer with the app's parameters."""
    from services.local.engines import SharedSileroVADAnalyzer

    vad = SharedSileroVADAnalyzer(
        engines.silero_session, params=VADParams(stop_secs=stop_secs, start_secs=0.2, min_volume=0.3)
    )
    vad.set_sample_rate(SR)
    state, events = VADState.QUIET, []
    for i in range(0, len(audio) - FRAME + 1, FRAME):
        new = vad.run_analyzer(audio[i : i + FRAME].tobytes())
        event = None
        if new != state and new in (VADState.SPEAKING, VADState.QUIET):
            event, state = ("start" if new == VADState.SPEAKING else "stop"), new
        events.append(event)
    return events


async def hear(service, engines, audio: np.ndarray, *, stop_secs: float = 0.2, speed: float = 1.0):
    """Stream `audio` into `service` (`speed` times real time) with the VAD's frames where the pipeline's
    VAD would send them; the end of the run waits for every segment's transcript."""
    events = vad_events(engines, audio, stop_secs)
    heard = Heard()
    worker = PipelineWorker(Pipeline([service, heard]), params=PipelineParams(audio_in_sample_rate=SR))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    t0 = time.perf_counter()
    for k, event in enumerate(events):
        await asyncio.sleep(max(0.0, t0 + (k + 1) * FRAME / SR / speed - time.perf_counter()))
        await worker.queue_frame(InputAudioRawFrame(audio[k * FRAME : (k + 1) * FRAME].tobytes(), SR, 1))
        if event == "start":
            await worker.queue_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
        elif event == "stop":
            await worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=stop_secs))
    await worker.queue_frame(EndFrame())  # Pipecat transcribes the segments still queued, then stops
    await asyncio.wait_for(run, 60)
    heard.stops = events.count("stop")
    return heard


def service(engines, **kwargs):
    from services.local.engines import SharedWhisperSTTService

    return SharedWhisperSTTService(engines.whisper, **kwargs)


def no_repeats(finals: list[TranscriptionFrame]) -> bool:
    """No transcript starts with the last words of the one before it (each carries only its own words)."""
    for a, b in zip(finals, finals[1:], strict=False):
        wa, wb = words(a.text), words(b.text)
        if any(wa[-n:] == wb[:n] for n in range(1, min(len(wa), len(wb), 3) + 1)):
            return False
    return True


MOTHER = ("Remind me to call my mother,", 0.45, "when I get home.")


@pytest.mark.parametrize("partials", [True, False])
async def test_a_sentence_split_at_a_pause_keeps_its_words(engines, partials):
    """At a 0.2 s VAD stop the pause cuts the sentence in two segments; together they read as one sentence,
    with no word twice."""
    svc = service(engines, partials=partials)
    heard = await hear(svc, engines, speech(*MOTHER), speed=1.0 if partials else 4.0)
    assert heard.stops >= 2 and len(heard.finals) >= 2, [f.text for f in heard.finals]
    said = " ".join(f.text for f in heard.finals)
    assert wer("Remind me to call my mother when I get home", said) <= 0.15, said
    assert no_repeats(heard.finals), [f.text for f in heard.finals]
    assert all(0.0 < f.result["confidence"] <= 1.0 for f in heard.finals)
    if not partials:  # each final read its whole segment
        assert not heard.partials and svc.finals_reused == 0 and not svc.partial_audio_secs
        assert all(secs > 0.5 for secs in svc.final_audio_secs)


async def test_the_final_comes_from_work_already_done(engines):
    """A 7 s recording in one breath: the partial started when the audio fell quiet hears it all, so the
    transcript at the VAD stop is that partial's, with no audio handed to Whisper again."""
    path, reference = librivox_clips()[0]
    audio, rate = read_wav(path)
    assert rate == SR
    svc = service(engines)
    heard = await hear(svc, engines, np.concatenate([audio, np.zeros(SR, np.int16)]), stop_secs=0.5)
    said = " ".join(f.text for f in heard.finals)
    assert wer(reference, said) <= 0.35, said
    assert heard.partials, "no partial transcript while the caller spoke"
    assert heard.stops == 1 and svc.final_audio_secs == [0.0] and svc.finals_reused == 1, svc.partial_audio_secs
    assert 0.0 < heard.finals[0].result["confidence"] <= 1.0


@pytest.mark.slow
async def test_a_long_utterance_keeps_partials_bounded(engines):
    """About 20 s of speech in one segment: no partial reads more than MAX_WINDOW_SECS (the words two partials
    agree on are committed as the window moves), and the final reads at most that much too."""
    text = (
        "Please tell me a long and detailed story about a brave little dragon who learns to fly "
        "over the mountains and the sea and then meets a clever old owl who lives in a tall oak tree "
        "at the edge of a quiet village where the children play in the river every summer afternoon"
    )
    audio = speech(text)
    svc = service(engines)
    heard = await hear(svc, engines, audio, stop_secs=0.5)
    said = " ".join(f.text for f in heard.finals)
    assert wer(text, said) <= 0.2, said
    assert no_repeats(heard.finals)
    assert len(svc.partial_audio_secs) >= 5
    assert max(svc.partial_audio_secs) <= svc.MAX_WINDOW_SECS
    assert max(svc.final_audio_secs) <= svc.MAX_WINDOW_SECS
    # the partials showed the words growing, never more than the reference's worth plus a few
    assert len(words(heard.partials[-1])) > len(words(heard.partials[0]))
    assert max(len(words(p)) for p in heard.partials) <= len(words(text)) + 5
