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
import re
import time
from collections import deque
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


_BYTES_PER_SEC = 16000 * 2  # Whisper's input: 16 kHz, 16-bit mono


def _norm(word: str) -> str:
    return re.sub(r"[^a-z0-9']+", "", word.lower())


@dataclass
class _Word:
    """One transcribed word as Whisper wrote it (with its leading space), its times in seconds from the
    segment's start, its call's confidence."""

    text: str
    start: float
    end: float
    confidence: float


def _text(words: list[_Word]) -> str:
    return "".join(w.text for w in words).strip()


def _repeated_head(head: list[str], tail: list[str], shortest: int) -> int:
    """How many words at the start of `head` repeat the last words of `tail` (the longest run of 5 down to
    `shortest` words), 0 if none: what Whisper re-hears at a cut, or copies from its prompt."""
    h, t = [_norm(w) for w in head], [_norm(w) for w in tail]
    for n in range(min(5, len(h), len(t)), shortest - 1, -1):
        if h[:n] == t[-n:]:
            return n
    return 0


def _agreed(a: list[_Word], b: list[_Word]) -> int:
    """The length of the longest common word prefix of two hypotheses (LocalAgreement)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if _norm(x.text) != _norm(y.text):
            break
        n += 1
    return n


@dataclass
class _Stream:
    """One VAD segment's streaming state: the words committed (only once the segment outgrows the window),
    where the audio not yet committed starts, the last partial's words after that point, and the partial
    in flight."""

    start_clock: float = 0.0  # the service's audio clock (seconds heard) when the VAD declared speech
    stop_clock: float = 0.0  # ... and at the end of speech (the VAD's stop minus its stop_secs)
    committed: list[_Word] = field(default_factory=list)
    commit_bytes: int = 0  # segment audio before this point is committed
    hypothesis: list[_Word] = field(default_factory=list)  # the last partial's words after the commit point
    agreed: int = 0  # how many of them the partial before it had too (LocalAgreement-2)
    heard_bytes: int = 0  # the segment audio committed + hypothesis were made from
    task: asyncio.Task | None = None  # the partial in flight
    task_end_bytes: int = 0  # the segment audio it transcribes ends here
    task_on_quiet: bool = False  # it started when the audio fell quiet
    end_bytes: int = 0  # the segment's length at the VAD stop
    speech_end_bytes: int = 0  # ... less the VAD's stop_secs of silence
    peak_db: float = -120.0  # the loudest frame so far
    quiet_bytes: int = 0  # audio in frames under the peak by QUIET_DB, in a row, up to now
    loud_since_launch: int = 0  # bytes of audio louder than that since the last partial started


class SharedWhisperSTTService(WhisperInternals):
    """Pipecat's segmented Whisper service on the shared model, made to stream: context across pauses,
    bounded partials, and the final from work already done.

    Pipecat's Whisper service is segmented only: it transcribes a VAD segment, from scratch, once the VAD
    says the user stopped. With the VAD's stop at 0.2 s (so that the transcript is in soon after the caller
    stops), a sentence with a pause in it becomes several segments. On top of confidence on every
    transcript (exp of Whisper's mean log-probability), this class adds:

    - context across short pauses: a segment starting within `CONTEXT_GAP_SECS` of audio after the
      previous one ended (the same turn, in practice) is transcribed with the previous nearby segments'
      last `CONTEXT_WORDS` words as Whisper's prompt. Each final still carries only its own segment's
      words (Pipecat's user aggregator joins a turn's transcripts); a head that repeats the prompt's last
      words is dropped. At a 0.2 s VAD stop the round trip cuts LibriVox's "he was not an | ill disposed
      young man" in two; alone, the second half is heard "an old-sposed young man" (the turn reads "not
      an an"), with the prompt it is right. Hearing the previous segment's audio again before the new
      one instead was measured and dropped (two words worse on the bench's sentences with pauses).
    - bounded partials: every `partial_interval` seconds (the next one waits `PARTIAL_DUTY` times as long
      as the last took), and at once when the audio falls quiet after speech no partial has started on
      (where the caller may have stopped; a partial still running on less is dropped for it), the
      segment is transcribed from its commit point, never more than `MAX_WINDOW_SECS` of audio. When the
      segment outgrows the window, the words the last two partials agree on (LocalAgreement-2, as in
      whisper_streaming) up to half a window back are committed, the window moves past them, and they
      become the prompt. Committing earlier, at every agreement, was measured and dropped: two partials
      of the first second or two agree on the same mistakes, and a window cut in the middle of a segment
      loses words, while saving almost nothing (below).
    - the final from work already done: at the VAD stop, if the last partial (done, or in flight and
      waited for) heard the segment up to where the VAD's silence began, its words are the final, with no
      new Whisper call; otherwise only the audio after the commit point is transcribed. With partials off
      the final is the whole segment, with the context of nearby segments.

    Whisper's encoder always reads a 30 s window, so a call costs about the same for 1 s of audio as for
    8 s (the decoder's share grows with the words): a shorter final saves little, a call not made saves
    it all. Counters for the tests and the bench: `partial_audio_secs` / `final_audio_secs` (the audio
    each call was handed; 0 for a final taken from a partial), `finals_reused`.
    """

    PARTIAL_DUTY = 3.0  # the next timed partial waits at least this many times as long as the last one took
    MAX_WINDOW_SECS = 8.0  # a partial never transcribes more audio than this
    CONTEXT_GAP_SECS = 3.0  # a segment this soon after the last one keeps its context
    CONTEXT_WORDS = 40  # words of nearby previous segments in the prompt (0: none)
    PROMPT_WORDS = 40  # at most this many words in a prompt (the committed words of a long segment)
    QUIET_DB = 25.0  # an audio frame this far under the segment's loudest is quiet ...
    QUIET_SECS = 0.1  # ... and this much quiet in a row starts a partial at once
    MIN_NEW_SPEECH_SECS = 0.02  # (if there is this much louder audio no partial has started on)
    TRAILING_SILENCE_SECS = 0.5  # appended to a partial's audio, as Pipecat appends it to a segment

    def __init__(self, model, *, beam_size: int = 1, partials: bool = True, partial_interval: float = 0.8, **kwargs):
        self._shared_model = model
        self._beam_size = beam_size
        self._partials = partials
        self._partial_interval = partial_interval
        self._last_partial = 0.0
        self._partial_cost = 0.0  # seconds the last partial took
        self._stream: _Stream | None = None  # the segment being spoken
        self._stopped: deque[_Stream] = deque()  # segments stopped, in the order run_stt gets them
        self._context: deque[tuple[float, float, list[str]]] = deque(maxlen=16)  # (start, stop clock, words)
        self._clock_bytes = 0  # all audio heard
        self.partial_audio_secs: list[float] = []
        self.final_audio_secs: list[float] = []
        self.finals_reused = 0
        settings = WhisperSTTService.Settings(model="tiny.en", language="en", no_speech_prob=0.6)
        super().__init__(settings=settings, **kwargs)

    def load_model(self):
        return self._shared_model

    # --- Whisper calls (in a thread) ---------------------------------------------------------------------

    def _transcribe(self, pcm: bytes, beam_size: int, prompt: str | None = None):
        """The segment's text and confidence (bench/turns.py calls this with only a `model`)."""
        words, confidence = SharedWhisperSTTService._transcribe_words(self, pcm, beam_size, prompt, 0.0, False)
        return _text(words), confidence

    def _transcribe_words(self, pcm: bytes, beam_size: int, prompt: str | None, offset: float, timed: bool):
        """The words (with their times + `offset` if `timed`, else all at `offset`) and the confidence."""
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        segments, _ = self.model.transcribe(
            audio,
            language="en",
            beam_size=beam_size,
            condition_on_previous_text=False,
            without_timestamps=not timed,
            word_timestamps=timed,
            initial_prompt=prompt or None,
        )
        kept = [s for s in segments if s.no_speech_prob < 0.6]
        confidence = _confidence(kept)
        if timed:
            pairs = [(w.word, w.start, w.end) for s in kept for w in s.words or []]
        else:
            pairs = [(" " + w, 0.0, 0.0) for s in kept for w in s.text.split()]
        words = [_Word(text, offset + start, offset + end, confidence) for text, start, end in pairs if _norm(text)]
        return words, confidence

    # --- context -----------------------------------------------------------------------------------------

    def _context_words(self, stream: _Stream) -> list[str]:
        """The words of the segments just before `stream`, each within CONTEXT_GAP_SECS of the next."""
        words: list[str] = []
        if not self.CONTEXT_WORDS:
            return words
        start = stream.start_clock
        for seg_start, seg_stop, seg_words in reversed(self._context):
            if seg_stop > start or start - seg_stop > self.CONTEXT_GAP_SECS:
                break
            words = seg_words + words
            start = seg_start
            if len(words) >= self.CONTEXT_WORDS:
                break
        return words[-self.CONTEXT_WORDS :]

    def _prompt(self, stream: _Stream) -> str:
        words = self._context_words(stream) + [w.text.strip() for w in stream.committed]
        return " ".join(words[-self.PROMPT_WORDS :])

    # --- frames ------------------------------------------------------------------------------------------

    @property
    def _clock(self) -> float:
        return self._clock_bytes / _BYTES_PER_SEC

    async def process_frame(self, frame: Frame, direction):
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._stream = _Stream(start_clock=self._clock)
            self._last_partial = time.monotonic()
            self._partial_cost = 0.0
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            stream, self._stream = self._stream or _Stream(start_clock=self._clock), None
            if self.is_usable:  # else Pipecat drops the segment (SegmentedSTTService)
                stream.end_bytes = len(self.segment)
                silence = int(frame.stop_secs * _BYTES_PER_SEC) // 2 * 2
                stream.speech_end_bytes = max(0, stream.end_bytes - silence)
                stream.stop_clock = self._clock - frame.stop_secs
                self._stopped.append(stream)
        await super().process_frame(frame, direction)

    async def process_audio_frame(self, frame, direction):
        await super().process_audio_frame(frame, direction)
        self._clock_bytes += len(frame.audio)
        stream = self._stream
        if not (self._partials and self.user_speaking and stream):
            return
        pcm = np.frombuffer(frame.audio, np.int16).astype(np.float32)
        db = 10 * math.log10(float(np.dot(pcm, pcm)) / max(len(pcm), 1) + 1.0)
        stream.peak_db = max(stream.peak_db, db)
        if db < stream.peak_db - self.QUIET_DB:
            stream.quiet_bytes += len(frame.audio)
        else:
            stream.quiet_bytes = 0
            stream.loud_since_launch += len(frame.audio)
        quiet = (
            stream.quiet_bytes >= self.QUIET_SECS * _BYTES_PER_SEC
            and stream.loud_since_launch >= self.MIN_NEW_SPEECH_SECS * _BYTES_PER_SEC
        )
        if stream.task is not None and not stream.task.done():
            if not quiet:
                return
            # The caller may have stopped, and the partial running started before their last words: it
            # cannot be the final, the one started now can. (Its thread runs out; its words are dropped.)
            stream.task.cancel()
        now = time.monotonic()
        timed = now - self._last_partial >= max(self._partial_interval, self.PARTIAL_DUTY * self._partial_cost)
        if timed or quiet:
            self._last_partial = now
            self._launch_partial(stream, quiet)

    def _launch_partial(self, stream: _Stream, on_quiet: bool) -> None:
        segment = self.segment
        end = len(segment)
        max_window = int(self.MAX_WINDOW_SECS * _BYTES_PER_SEC)
        if end - stream.commit_bytes > max_window:
            self._commit(stream, (end - max_window // 2) / _BYTES_PER_SEC)
            stream.commit_bytes = max(stream.commit_bytes, end - max_window)
        start = stream.commit_bytes
        pcm = segment[start:end] + bytes(int(self.TRAILING_SILENCE_SECS * _BYTES_PER_SEC))
        # word times only once the window may have to move (the alignment costs a pass)
        timed = end - start > max_window // 3
        stream.task_end_bytes, stream.task_on_quiet = end, on_quiet
        stream.loud_since_launch = 0
        self.partial_audio_secs.append((end - start) / _BYTES_PER_SEC)
        stream.task = self.create_task(
            self._run_partial(stream, pcm, start, end, self._prompt(stream), timed), name="whisper-partial"
        )

    @staticmethod
    def _commit(stream: _Stream, limit: float) -> None:
        """Commit the last hypothesis's words ending by `limit` (seconds into the segment): those two partials
        agreed on, or if none, those it heard; the uncommitted audio starts in the gap after the last."""
        words = stream.hypothesis
        timed = [i for i, w in enumerate(words) if w.end > 0 and w.end <= limit]
        k = sum(1 for i in timed if i < stream.agreed) or len(timed)
        if k == 0 or not words[k - 1].end:
            return
        cut = words[k - 1].end if k == len(words) else (words[k - 1].end + words[k].start) / 2
        stream.committed += words[:k]
        stream.hypothesis, stream.agreed = words[k:], max(0, stream.agreed - k)
        stream.commit_bytes = max(stream.commit_bytes, int(cut * _BYTES_PER_SEC) // 2 * 2)

    def _new_words(self, stream: _Stream, words: list[_Word], start: int) -> list[_Word]:
        """`words` heard from `start` (bytes into the segment), less a head that repeats what came before it:
        the committed words re-heard at a cut, or the context's last words copied from the prompt."""
        if stream.committed:
            at = start / _BYTES_PER_SEC
            head = [w.text for w in words if w.start < at + 0.5]
            return words[_repeated_head(head, [w.text for w in stream.committed], 1) :]
        return words[_repeated_head([w.text for w in words], self._context_words(stream), 2) :]

    async def _run_partial(self, stream: _Stream, pcm: bytes, start: int, end: int, prompt: str, timed: bool):
        t0 = time.monotonic()
        try:
            words, confidence = await asyncio.to_thread(
                self._transcribe_words, pcm, self._beam_size, prompt, start / _BYTES_PER_SEC, timed
            )
        except Exception as e:  # a failed partial is not worth an error to the user
            logger.debug(f"{self}: partial transcription failed: {e}")
            return
        finally:
            self._partial_cost = time.monotonic() - t0
        if start != stream.commit_bytes:
            return
        words = self._new_words(stream, words, start)
        stream.agreed = _agreed(stream.hypothesis, words)
        stream.hypothesis, stream.heard_bytes = words, end
        text = _text(stream.committed + stream.hypothesis)
        if text and stream is self._stream and self.user_speaking:
            await self.push_frame(
                InterimTranscriptionFrame(
                    text, self.speaker_id, time_now_iso8601(), Language.EN, result={"confidence": confidence}
                )
            )

    async def cancel(self, frame):
        for stream in [self._stream, *self._stopped]:
            if stream and stream.task:
                await self.cancel_task(stream.task)
        await super().cancel(frame)

    # --- the final ---------------------------------------------------------------------------------------

    async def _final_words(self, stream: _Stream, audio: bytes) -> list[_Word]:
        # The last partial heard all the speech if its audio reaches where the VAD's silence began, or if it
        # started when the audio fell quiet and nothing louder came after (Silero's stop lags the level).
        heard_all = stream.task is not None and (
            stream.task_end_bytes >= stream.speech_end_bytes or (stream.task_on_quiet and not stream.loud_since_launch)
        )
        if stream.task is not None:
            if heard_all:
                await asyncio.wait([stream.task])  # its words are the final
            elif not stream.task.done():
                stream.task.cancel()  # too early to be the final: not waited for (its thread runs out)
                await asyncio.wait([stream.task])
        if heard_all and stream.heard_bytes == stream.task_end_bytes and stream.hypothesis:
            self.finals_reused += 1
            self.final_audio_secs.append(0.0)
            return stream.committed + self._spoken(stream, stream.hypothesis)
        start = min(stream.commit_bytes, stream.end_bytes)
        self.final_audio_secs.append((stream.end_bytes - start) / _BYTES_PER_SEC)
        words, _ = await asyncio.to_thread(
            self._transcribe_words,
            audio[start:],
            self._beam_size,
            self._prompt(stream),
            start / _BYTES_PER_SEC,
            bool(stream.committed),  # a tail after a commit may be mostly silence: time its words
        )
        return stream.committed + self._spoken(stream, self._new_words(stream, words, start))

    @staticmethod
    def _spoken(stream: _Stream, words: list[_Word]) -> list[_Word]:
        """Less the timed words that start after the speech ended (Whisper's "thanks for watching" on a
        window that ends in silence)."""
        limit = stream.speech_end_bytes / _BYTES_PER_SEC + 0.3
        return [w for w in words if not w.end or w.start <= limit]

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame, None]:
        if not self.model:
            yield ErrorFrame("Whisper model not available")
            return
        stream = self._stopped.popleft() if self._stopped else _Stream(end_bytes=len(audio), speech_end_bytes=1)
        await self.start_processing_metrics()
        try:
            words = await self._final_words(stream, audio)
        finally:
            await self.stop_processing_metrics()
        text = _text(words)
        confidence = round(sum(w.confidence for w in words) / len(words), 3) if words else 0.0
        self._context.append((stream.start_clock, stream.stop_clock, [w.text.strip() for w in words]))
        if text:
            logger.debug(f"{self}: transcription [{text}] confidence {confidence}")
            yield TranscriptionFrame(
                text, self.speaker_id, time_now_iso8601(), Language.EN, result={"confidence": confidence}
            )
