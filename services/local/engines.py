"""Local engines, loaded once per process and shared by every session.

Pipecat's local services each load their model in `__init__` (Whisper 245 MB, Piper 63 MB, Silero
and smart-turn ONNX sessions ~22 MB plus ~20 MB after first use), which is why a bare Pipecat server
costs ~50 MB and a model load per call. Here one `LocalEngines` object holds the heavy, read-only
parts (the CTranslate2 Whisper model, the Piper voice, the ONNX inference sessions) and thin
subclasses of Pipecat's services and analyzers take them instead of loading their own. Per-session
state (VAD recurrent state, audio buffers) stays per session.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from loguru import logger

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipecat.audio.vad.vad_analyzer import VADParams, VADState  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.services.piper.tts import PiperTTSService  # noqa: E402
from pipecat.services.whisper.stt import WhisperSTTService  # noqa: E402
from pipecat.transcriptions.language import Language  # noqa: E402
from pipecat.utils.time import time_now_iso8601  # noqa: E402

from compat.pipecat import (  # noqa: E402
    PiperInternals,
    SileroInternals,
    SmartTurnInternals,
    WhisperInternals,
    silero_session,
    smart_turn_session,
)
from services.local import models  # noqa: E402


@dataclass
class LocalEngines:
    """The process-wide models. Build with `LocalEngines.load()` (blocking, seconds)."""

    whisper: object | None = None
    piper_voice: object | None = None
    silero_session: object | None = None
    smart_turn_session: object | None = None
    load_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, *, stt: bool = True, tts: bool = True, smart_turn: bool = True, cache_dir=None) -> LocalEngines:
        """Load the models; each model's files are checked against their SHA-256 first (services/local/models.py),
        with the check's stamp kept in `cache_dir`."""
        engines = cls()
        t0 = time.perf_counter()
        # Silero and smart-turn: build one analyzer each the normal way and keep its session.
        engines.silero_session = silero_session()
        engines.load_seconds["silero"] = time.perf_counter() - t0
        if smart_turn:
            t = time.perf_counter()
            engines.smart_turn_session = smart_turn_session()
            engines.load_seconds["smart_turn"] = time.perf_counter() - t
        if stt:
            from faster_whisper import WhisperModel

            t = time.perf_counter()
            engines.whisper = WhisperModel(
                str(models.verified_whisper_dir(cache_dir)),
                device="cpu",
                compute_type="int8",
                cpu_threads=2,
                num_workers=2,
            )
            engines.load_seconds["whisper"] = time.perf_counter() - t
        if tts:
            from piper import PiperVoice

            t = time.perf_counter()
            engines.piper_voice = PiperVoice.load(models.verified_piper_dir(cache_dir) / f"{models.PIPER_VOICE}.onnx")
            engines.load_seconds["piper"] = time.perf_counter() - t
        logger.info("Local engines loaded: " + ", ".join(f"{k} {v:.2f}s" for k, v in engines.load_seconds.items()))
        return engines


_VAD_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="silero")


class SharedSileroVADAnalyzer(SileroInternals):
    """Pipecat's Silero analyzer with the process-wide ONNX session (state stays per session), made cheap
    enough for 100 sessions in one process. Pipecat's analyzer hops to a thread of its own per session for
    every 20 ms chunk; at 10 sessions those hops cost about 8 times what Silero itself does. Here:

    - while the user is quiet (the VAD's state is QUIET), windows quieter than `gate_dbfs` RMS (default
      -60 dBFS: digital silence, a muted or noise-suppressed mic, a silent phone line) score 0 without
      running the model, and the model's recurrent state is reset before the next window it scores (Silero
      then starts fresh, as after its own periodic reset). From speech start until the VAD has declared
      the stop, every window is scored, so turns end exactly where Pipecat's analyzer ends them (gating
      those too split utterances at their pauses: Silero's own confidence decays over a few windows).
      Speech is -20 to -45 dBFS; Pipecat's own volume gate (0.3 = -80 LUFS) rejects only near silence.
    - a skipped window's loudness is not measured either (Pipecat measures BS.1770 loudness over the
      last 400 ms for every window; the window still enters that rolling buffer): with confidence 0 the
      window cannot count as speech whatever its volume.
    - a chunk with no window to score is analysed right here on the event loop, with no thread hop; a
      chunk with speech goes to one process-wide Silero thread (ONNX releases the GIL while it runs).
    - a monologue is cut: after `max_speech_secs` of speech without a stop (counted in audio, not wall
      time) the VAD declares a stop, then hears nothing for `hold_secs` so the turn strategy ends the turn
      on what was said (Pipecat has no bound: Whisper's segment, its partials and the turn's text would
      grow for as long as someone talks). Speech after the hold starts a new turn, as a barge-in would.
    """

    def __init__(
        self,
        session,
        *,
        sample_rate: int | None = None,
        params: VADParams | None = None,
        gate_dbfs: float = -60.0,
        max_speech_secs: float = 0.0,
        hold_secs: float = 1.0,
    ):
        super().__init__(session, sample_rate=sample_rate, params=params)
        # mean square in int16 units; at -100 dBFS or lower the gate is off (every window is scored)
        self._gate_sq = (32768.0 * 10 ** (gate_dbfs / 20)) ** 2 if gate_dbfs > -100 else -1.0
        self._skipped = False  # windows were skipped since the model last ran: reset it first
        self._gated = False  # the window being analysed was skipped
        self.windows_scored = self.windows_skipped = 0
        self._max_speech_secs = max_speech_secs  # 0: no bound
        self._hold_secs = hold_secs
        self._speech_bytes = 0  # audio analysed since the VAD declared speech, without a stop
        self._hold_bytes = 0  # audio still to be heard as silence after a forced stop
        self.forced_stops = 0

    def _quiet(self, audio: np.ndarray) -> bool:
        return len(audio) == 0 or float(np.dot(audio, audio)) / len(audio) < self._gate_sq

    def voice_confidence(self, buffer: bytes) -> float:
        if self._hold_bytes > 0:  # after a forced stop: silence, whatever is said
            self._hold_bytes -= len(buffer)
            self._skipped = self._gated = True
            return 0.0
        audio = np.frombuffer(buffer, np.int16).astype(np.float32)
        if self.state == VADState.QUIET and self._quiet(audio):
            self.windows_skipped += 1
            self._skipped = self._gated = True
            return 0.0
        self._gated = False
        if self._skipped:
            self.reset_model()
            self._skipped = False
        self.windows_scored += 1
        return super().voice_confidence(buffer)

    def smoothed_volume(self, audio: bytes) -> float:
        if self._gated:
            return self.track_volume(audio)
        return super().smoothed_volume(audio)

    def run_analyzer(self, buffer: bytes) -> VADState:
        state = super().run_analyzer(buffer)
        if not self._max_speech_secs:
            return state
        if state in (VADState.SPEAKING, VADState.STOPPING):
            self._speech_bytes += len(buffer)
            if self._speech_bytes >= self._max_speech_secs * self.sample_rate * 2:
                self._force_stop()
                return self.state
        else:
            self._speech_bytes = 0
        return state

    def _force_stop(self) -> None:
        logger.info(f"VAD: {self._max_speech_secs:g} s of speech without a pause; ending the user's turn there")
        self.force_quiet()
        self._speech_bytes = 0
        self._hold_bytes = int(self._hold_secs * self.sample_rate) * 2
        self.forced_stops += 1

    async def analyze_audio(self, buffer: bytes):
        pending = self.pending_with(buffer)
        if len(pending) < self.window_bytes or (
            self.state == VADState.QUIET and self._quiet(np.frombuffer(pending, np.int16).astype(np.float32))
        ):
            return self.run_analyzer(buffer)
        return await asyncio.get_running_loop().run_in_executor(_VAD_EXECUTOR, self.run_analyzer, buffer)


class SharedSmartTurnAnalyzerV3(SmartTurnInternals):
    """Pipecat's local smart-turn v3 with the process-wide ONNX session."""


class SharedPiperTTSService(PiperInternals):
    """Pipecat's Piper service speaking with the process-wide voice instead of loading its own."""

    def __init__(self, voice, **kwargs):
        settings = PiperTTSService.Settings(model=None, voice=models.PIPER_VOICE, language=None)
        super().__init__(voice, settings=settings, **kwargs)


def _confidence(segments) -> float:
    """Whisper gives a mean log-probability per segment; exp() of its duration-weighted mean."""
    total = sum(max(s.end - s.start, 0.01) for s in segments)
    if not total:
        return 0.0
    logprob = sum(s.avg_logprob * max(s.end - s.start, 0.01) for s in segments) / total
    return round(min(1.0, math.exp(logprob)), 3)


class SharedWhisperSTTService(WhisperInternals):
    """Pipecat's segmented Whisper service on the shared model, with confidence and live partials.

    Pipecat's service transcribes only once the VAD says the user stopped. We add two things users
    notice: `confidence` on every transcript (exp of Whisper's mean log-probability), and partial
    transcripts while the user is still talking, by re-transcribing the growing segment every
    `partial_interval` seconds (greedy, one at a time, skipped when the previous one still runs).

    Each partial re-reads the whole segment, so its cost grows with the segment: the next partial
    starts at least `PARTIAL_DUTY` times as long after the last one as that one took, which keeps
    partials to a third of one thread however long someone talks (the VAD also cuts a turn at
    ATLAS_MAX_USER_TURN_SECS).
    """

    PARTIAL_DUTY = 3.0

    def __init__(self, model, *, beam_size: int = 1, partials: bool = True, partial_interval: float = 0.8, **kwargs):
        self._shared_model = model
        self._beam_size = beam_size
        self._partials = partials
        self._partial_interval = partial_interval
        self._partial_task: asyncio.Task | None = None
        self._last_partial = 0.0
        self._partial_cost = 0.0  # seconds the last partial took
        self._segment_generation = 0
        settings = WhisperSTTService.Settings(model="tiny.en", language="en", no_speech_prob=0.6)
        super().__init__(settings=settings, **kwargs)

    def load_model(self):
        return self._shared_model

    def _transcribe(self, pcm: bytes, beam_size: int):
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        segments, _ = self.model.transcribe(
            audio, language="en", beam_size=beam_size, condition_on_previous_text=False, without_timestamps=True
        )
        kept = [s for s in segments if s.no_speech_prob < 0.6]
        text = " ".join(s.text.strip() for s in kept).strip()
        return text, _confidence(kept)

    async def process_frame(self, frame: Frame, direction):
        if isinstance(frame, (VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)):
            # A new segment boundary: any partial still running belongs to the old one.
            self._segment_generation += 1
            self._last_partial = time.monotonic()
            self._partial_cost = 0.0
        await super().process_frame(frame, direction)

    async def process_audio_frame(self, frame, direction):
        await super().process_audio_frame(frame, direction)
        if (
            self._partials
            and self.user_speaking
            and (self._partial_task is None or self._partial_task.done())
            and time.monotonic() - self._last_partial
            >= max(self._partial_interval, self.PARTIAL_DUTY * self._partial_cost)
        ):
            self._last_partial = time.monotonic()
            self._partial_task = self.create_task(
                self._run_partial(self.segment, self._segment_generation), name="whisper-partial"
            )

    async def _run_partial(self, pcm: bytes, generation: int):
        t0 = time.monotonic()
        try:
            text, confidence = await asyncio.to_thread(self._transcribe, pcm, 1)
        except Exception as e:  # a failed partial is not worth an error to the user
            logger.debug(f"{self}: partial transcription failed: {e}")
            return
        finally:
            self._partial_cost = time.monotonic() - t0
        if text and generation == self._segment_generation and self.user_speaking:
            await self.push_frame(
                InterimTranscriptionFrame(
                    text, self.speaker_id, time_now_iso8601(), Language.EN, result={"confidence": confidence}
                )
            )

    async def cancel(self, frame):
        if self._partial_task:
            await self.cancel_task(self._partial_task)
        await super().cancel(frame)

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame, None]:
        if not self.model:
            yield ErrorFrame("Whisper model not available")
            return
        await self.start_processing_metrics()
        try:
            text, confidence = await asyncio.to_thread(self._transcribe, audio, self._beam_size)
        finally:
            await self.stop_processing_metrics()
        if text:
            logger.debug(f"{self}: transcription [{text}] confidence {confidence}")
            yield TranscriptionFrame(
                text, self.speaker_id, time_now_iso8601(), Language.EN, result={"confidence": confidence}
            )
