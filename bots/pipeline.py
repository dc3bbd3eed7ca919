"""The one pipeline builder every door (WebSocket, Twilio, Daily) shares.

transport in -> STT -> user aggregator (Silero VAD, then the speech timeout or smart-turn; the
caller's audio goes no further) -> context window (last N
messages; the system prompt lives in the LLM settings) -> LLM -> first clause (a reply's first
clause as its own chunk) -> TTS (sentence aggregation) -> transport out -> assistant aggregator
(keeps only what was actually sent to be spoken).

`Runtime` holds what is loaded once per process (engines, the local LLM server) and is passed to
every build.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from loguru import logger
from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregator,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import (
    SpeechTimeoutUserTurnStopStrategy,
)
from pipecat.turns.user_stop.turn_analyzer_user_turn_stop_strategy import (
    TurnAnalyzerUserTurnStopStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from bots.auth import TokenVerifier
from bots.limits import AbuseLimits
from config.settings import Settings
from monitoring.metrics import Monitor
from processors.context_window import ContextWindow
from processors.first_clause import FirstClauseTextProcessor
from processors.sentence_marker import SentenceMarker
from services.factory import make_llm, make_stt, make_tts
from services.local.engines import (
    LocalEngines,
    SharedSileroVADAnalyzer,
    SharedSmartTurnAnalyzerV3,
)
from storage import make_recorder
from storage.outbox import Recorder
from transports.protocol import RECEIVED_AT

CLIENT_SAMPLE_RATE = 16000


@dataclass
class Runtime:
    """Process-wide state: loaded once at start-up, shared by every session."""

    settings: Settings
    engines: LocalEngines | None = None
    llm_base_url: str | None = None
    llm_model: str = "local"
    llm_server: object | None = None
    auth: TokenVerifier | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    load_error: str | None = None
    recorder: Recorder | None = None
    monitor: Monitor | None = None
    sessions: int = 0  # admitted sessions, every door (the ATLAS_MAX_SESSIONS cap)
    tasks: set = field(default_factory=set)  # background sessions (Daily bots)
    live: dict = field(default_factory=dict)  # running VoiceSessions by id, every door (drained on shutdown)
    limits: AbuseLimits | None = None  # per-IP / per-user / pending-connection limits, every door
    twilio_tokens: object | None = None  # bots.twilio_bot.StreamTokens, made on first use
    shutting_down: bool = False
    _http: object | None = None

    def track(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def http(self):
        """One aiohttp session per process for REST calls to vendors (Daily), with a short timeout."""
        import aiohttp

        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.db_timeout_secs * 2))
        return self._http

    def __post_init__(self):
        if self.recorder is None:
            self.recorder = make_recorder(self.settings)
        if self.monitor is None:
            self.monitor = Monitor(self.settings)
            self.monitor.attach_recorder(self.recorder)
        if self.limits is None:
            self.limits = AbuseLimits(self.settings)

    @property
    def output_sample_rate(self) -> int:
        voice = getattr(self.engines, "piper_voice", None)
        return voice.config.sample_rate if voice is not None else 22050

    def can_admit(self) -> bool:
        """Whether a new session would be admitted now (at ATLAS_MAX_SESSIONS, shutting down, or the
        outbox over its disk cap: no)."""
        if self.shutting_down or self.sessions >= self.settings.max_sessions:
            return False
        return not self.recorder.full

    def admit(self) -> bool:
        """Take a session slot, or False when the process is at ATLAS_MAX_SESSIONS, shutting down, or
        its outbox is over ATLAS_OUTBOX_MAX_MB (sessions wait until the store takes the backlog)."""
        if self.shutting_down:
            return False
        if self.sessions >= self.settings.max_sessions:
            logger.warning(f"session refused: at the limit of {self.settings.max_sessions} sessions")
            return False
        if self.recorder.full:
            logger.warning("session refused: the outbox is over ATLAS_OUTBOX_MAX_MB until the store catches up")
            return False
        self.sessions += 1
        return True

    def release(self) -> None:
        self.sessions -= 1

    @classmethod
    async def start(cls, settings: Settings) -> "Runtime":
        runtime = cls(settings=settings)
        await runtime.start_recorder()
        await runtime.load()
        return runtime

    async def start_recorder(self) -> None:
        """Open the outbox and start sending rows (first those a previous run left behind)."""
        await self.recorder.start()
        logger.info(f"recording sessions to {self.recorder.sink.name}"
                    + (f" ({self.settings.resolved_sqlite_path})" if self.recorder.sink.name == "sqlite" else ""))

    async def load(self) -> None:
        """Load engines (in a thread: seconds of model loading) and start the local LLM if used.

        Piper is always loaded: it is every cloud voice's fallback. Whisper only when it is the STT.
        With Claude, the local LLM is its fallback (ATLAS_LLM_FALLBACK=local, the default).
        """
        s = self.settings
        try:
            s.check_providers()
            self.auth = TokenVerifier.from_settings(s)
            logger.info(f"providers: stt={s.resolved_stt} llm={s.resolved_llm} tts={s.resolved_tts}")
            self.engines = await asyncio.to_thread(
                LocalEngines.load, stt=s.resolved_stt == "whisper", smart_turn=s.smart_turn, cache_dir=s.cache_dir
            )
            local_llm = s.resolved_llm != "anthropic" or s.llm_fallback == "local"
            if s.llm_url and local_llm:
                self.llm_base_url, self.llm_model = s.llm_url, s.llm_model_name
            elif s.resolved_llm == "openai":
                raise ValueError("ATLAS_LLM=openai needs ATLAS_LLM_URL")
            elif local_llm:
                from services.local.llama_server import LlamaServer
                from services.local.models import resolve_llm_path

                path = await asyncio.to_thread(resolve_llm_path, s.llm_model_path, s.cache_dir, False)
                server = LlamaServer(path, threads=s.llm_threads, context_tokens=s.llm_context_tokens)
                await server.start()
                self.llm_server, self.llm_base_url, self.llm_model = server, server.base_url, "local"
            self.ready.set()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            logger.exception(f"Engine loading failed: {e}")
            raise

    async def drain(self, grace_secs: float) -> int:
        """Graceful shutdown, first half: refuse new sessions, end every live one (its client gets
        `SERVER_SHUTTING_DOWN` and `session_end`, its rows go to the outbox) and wait up to
        `grace_secs` for them to finish. Returns how many were still running at the deadline."""
        from transports.protocol import SHUTTING_DOWN_MESSAGE, ErrorCode

        self.shutting_down = True
        if self.live:
            logger.info(f"shutting down: ending {len(self.live)} live session(s) (grace {grace_secs:g} s)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_secs
        while self.live and loop.time() < deadline:
            # Again each pass: a session admitted just before the signal joins `live` a moment later.
            stops = [session.stop("server_shutdown", (ErrorCode.SERVER_SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE))
                     for session in list(self.live.values()) if not session.stopping]
            for result in await asyncio.gather(*stops, return_exceptions=True):
                if isinstance(result, Exception):  # one stuck session must not keep the others from ending
                    logger.warning(f"a session did not stop cleanly: {result!r}")
            await asyncio.sleep(0.05)
        if self.live:
            logger.warning(f"{len(self.live)} session(s) still running after {grace_secs:g} s; exiting anyway")
        return len(self.live)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        if self.llm_server is not None:
            await self.llm_server.stop()
        await self.recorder.close(timeout=self.settings.db_timeout_secs)
        logger.info("shutdown complete")


class UserAggregator(LLMUserAggregator):
    """Pipecat's user aggregator, except that the caller's audio stops here, and a session that has
    fallen too far behind its caller is reported.

    Pipecat's aggregator runs the VAD and turn analyzer on the caller's audio, then pushes every
    `InputAudioRawFrame` on down the pipeline: context window, LLM, first clause, TTS, sentence
    marker, output transport and assistant aggregator each take 50 frames a second per session that
    none of them uses (a queue hop and a task wake-up each). Past this point nothing needs them.

    Pipecat's queues in front of this point (the input transport's, the STT's) are unbounded: when the
    process cannot keep up, a session's audio waits there and the caller hears replies later and
    later. Each caller frame carries the time it arrived (transports.protocol.RECEIVED_AT); once one
    reaches here more than `max_lag_secs` late, `on_backlog(lag)` is called (once), and the session
    ends (AUDIO_BACKLOG), which bounds what any one session can queue.

    `LLMContextAggregatorPair` builds it as Pipecat's and `build_pipeline` changes its class, then
    sets `on_backlog` and `max_lag_secs`.
    """

    on_backlog = None
    max_lag_secs = 0.0

    async def process_frame(self, frame, direction: FrameDirection):
        if self.on_backlog is not None and isinstance(frame, InputAudioRawFrame):
            received = frame.metadata.get(RECEIVED_AT)
            if received is not None and time.monotonic() - received > self.max_lag_secs:
                callback, self.on_backlog = self.on_backlog, None
                callback(time.monotonic() - received)
        await super().process_frame(frame, direction)

    async def push_frame(self, frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        if direction == FrameDirection.DOWNSTREAM and isinstance(frame, InputAudioRawFrame):
            return
        await super().push_frame(frame, direction)


@dataclass
class BuiltPipeline:
    pipeline: Pipeline
    context: LLMContext
    llm: object
    context_window: ContextWindow


def build_pipeline(runtime: Runtime, transport, on_backlog=None) -> BuiltPipeline:
    """The pipeline for one session on `transport`; `on_backlog(lag_secs)` is called once if the session
    falls more than ATLAS_MAX_AUDIO_LAG_SECS behind its caller's audio."""
    s = runtime.settings
    engines = runtime.engines
    assert engines is not None, "engines are not loaded"

    stt, llm, tts = make_stt(runtime), make_llm(runtime), make_tts(runtime)

    vad = SharedSileroVADAnalyzer(
        engines.silero_session,
        params=VADParams(stop_secs=s.vad_stop_secs, start_secs=s.vad_start_secs, min_volume=s.vad_min_volume),
        gate_dbfs=s.vad_gate_dbfs,
        max_speech_secs=s.max_user_turn_secs,
        # long enough for the turn strategy to end the turn on the forced stop
        hold_secs=(s.smart_turn_stop_secs if s.smart_turn else s.user_speech_timeout_secs) + 0.5,
    )
    if s.smart_turn and engines.smart_turn_session is not None:
        stop = [
            TurnAnalyzerUserTurnStopStrategy(
                turn_analyzer=SharedSmartTurnAnalyzerV3(
                    engines.smart_turn_session, params=SmartTurnParams(stop_secs=s.smart_turn_stop_secs)
                )
            )
        ]
    else:
        stop = [SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=s.user_speech_timeout_secs)]

    context = LLMContext()
    aggregators = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(vad_analyzer=vad, user_turn_strategies=UserTurnStrategies(stop=stop)),
    )
    user = aggregators.user()
    user.__class__ = UserAggregator
    user.on_backlog, user.max_lag_secs = on_backlog, s.max_audio_lag_secs
    window = ContextWindow(max_messages=s.context_messages)
    # Each reply's first clause goes to TTS on its own; the TTS aggregates the rest by sentence.
    first_clause = [FirstClauseTextProcessor(min_words=s.first_clause_words)] if s.first_clause_words else []
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            aggregators.user(),
            window,
            llm,
            *first_clause,
            tts,
            SentenceMarker(),
            transport.output(),
            aggregators.assistant(),
        ]
    )
    return BuiltPipeline(pipeline=pipeline, context=context, llm=llm, context_window=window)
