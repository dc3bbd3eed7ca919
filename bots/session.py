"""What every door's session shares: one pipeline run, its limits, and its telemetry.

A door (the browser WebSocket, a Twilio media stream, a Daily room) makes a transport and hands it
to `VoiceSession.run()`, which builds the one shared pipeline, runs it, enforces the idle timeout
and the maximum duration, and records the session: its row at the start, a row per turn as each
closes, the full row at the end (the same numbers the door may send its client), and /metrics.
Doors subclass it for what differs: how the client is told things (`notify_limit`), extra
observers, and what happens when the pipeline starts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
import uuid
from dataclasses import dataclass, field

from loguru import logger
from pipecat.frames.frames import EndFrame, TTSSpeakFrame
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

from bots.pipeline import build_pipeline
from bots.runtime import Runtime
from bots.tools import TOOL_APOLOGY, ToolCall
from compat.pipecat import SafeErrorsRTVIProcessor, select_frames
from config.agents import Agent
from processors.turn_metrics import Turn, TurnMetricsObserver
from storage.records import (
    INSERT,
    SESSIONS,
    TURNS,
    UPSERT,
    SessionInfo,
    provider_models,
    transcript,
    turn_row,
)
from vocabulary.audio import CLIENT_SAMPLE_RATE
from vocabulary.errors import ErrorCode
from vocabulary.frames import CodedErrorFrame, coded_error
from vocabulary.records import SessionEnd, TurnRecord

RESUME_MESSAGES = 40  # what a resumed conversation gets back (the context window then keeps its last N)
END_CALL_GRACE_SECS = 20.0  # an ending call whose goodbye has not finished playing by then is cut

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
FIELD_LIMITS = {"user_id": 64, "client_user_id": 256, "conversation_id": 256, "user_agent": 512, "ip_address": 64}


def clean_text(value, limit: int) -> str | None:
    """A stored text field from the edge: a string without control characters, at most `limit` long,
    else None. Whatever a client or Twilio sends, the row built from it can be stored."""
    if not isinstance(value, str):
        return None
    value = _CONTROL.sub("", value)[:limit].strip()
    return value or None


@dataclass
class Caller:
    """Who is on the other end, as far as the door knows. Every field is cleaned on construction
    (`clean_text`): a door may pass what a client sent, of any JSON type."""

    user_id: str | None = None  # verified (an auth.users id), else None
    client_user_id: str | None = None  # what the client says, unverified
    conversation_id: str | None = None
    user_agent: str | None = None
    ip_address: str | None = None

    def __post_init__(self):
        for name, limit in FIELD_LIMITS.items():
            setattr(self, name, clean_text(getattr(self, name), limit))
        # Typed columns in Postgres: `ip_address inet`, `user_id uuid`.
        try:
            self.ip_address = str(ipaddress.ip_address(self.ip_address)) if self.ip_address else None
        except ValueError:
            self.ip_address = None
        try:
            self.user_id = str(uuid.UUID(self.user_id)) if self.user_id else None
        except ValueError:
            self.user_id = None


@dataclass
class VoiceSession:
    runtime: Runtime
    caller: Caller
    transport_name: str = "websocket"
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started_at: float = field(default_factory=time.monotonic)
    last_audio_at: float = field(default_factory=time.monotonic)
    end_reason: str = "client_disconnected"
    stopping: bool = False
    worker: PipelineWorker | None = None
    metrics: TurnMetricsObserver = field(init=False)
    info: SessionInfo = field(init=False)
    _final: SessionEnd | None = field(default=None, init=False)
    pipeline_started: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _side_tasks: set = field(default_factory=set, init=False)
    llm_slot: int | None = field(default=None, init=False)  # the local LLM's slot this conversation holds
    agent: Agent | None = None  # the agent the client asked for; None: the rollout's choice (bots/rollout.py)
    speed: float = 1.0  # the voice's speed (session_start `speed`, checked by the door)
    rollout_key: str | None = None  # who the caller is, for the rollout's stable split (None: the caller's address)
    variant: str | None = field(default=None, init=False)  # the rollout's variant; None: no rollout, or asked for
    # Resuming (doors whose clients can come back): the conversation's messages so far, the session it continues
    # and how many times it was resumed; `resumable` keeps this session's messages for a resume when it ends.
    history: list[dict] | None = None
    resumed_from: str | None = None
    reconnects: int = 0
    resumable: bool = False
    context: object | None = field(default=None, init=False)  # the pipeline's LLMContext (make_worker)

    def __post_init__(self):
        if self.agent is None:
            key = self.rollout_key or self.caller.user_id or self.caller.client_user_id or self.caller.ip_address
            self.agent, self.variant = self.runtime.rollout.assign(key)
        self.metrics = TurnMetricsObserver(on_turn_closed=self._record_turn, on_reply_started=self.on_reply_started)
        c = self.caller
        self.info = SessionInfo(
            id=self.session_id,
            transport=self.transport_name,
            started_at=time.time(),
            user_id=c.user_id,
            client_user_id=c.client_user_id,
            conversation_id=c.conversation_id,
            models=provider_models(self.runtime.agent_settings(self.agent)),
            user_agent=c.user_agent,
            ip_address=c.ip_address,
            store_transcripts=self.agent.store_transcripts,
            agent=self.agent.name,
            variant=self.variant,
            resumed_from=self.resumed_from,
            reconnects=self.reconnects,
        )

    # --- telemetry ---------------------------------------------------------------------------

    def describe_user(self) -> str:
        """Who the session belongs to, for the log (doors whose ids are personal data override it)."""
        return str(self.caller.user_id or self.caller.client_user_id)

    def touch_audio(self, _n: int = 0) -> None:
        self.last_audio_at = time.monotonic()

    def _record_turn(self, turn: Turn) -> None:
        record = turn.record()
        self.runtime.recorder.submit(TURNS, INSERT, [turn_row(self.info, record)])
        self.runtime.monitor.turn_recorded(self.transport_name, record)
        self.on_turn_recorded(record)

    def on_turn_recorded(self, record: TurnRecord) -> None:
        """A turn closed and was recorded (called from inside the pipeline: do not wait here); doors override."""

    def on_reply_started(self, turn: Turn) -> None:
        """A turn's reply began to play: its latency, stage by stage, is known (`turn.record()`; called from inside
        the pipeline: do not wait here); doors that tell their client override."""

    def count_error(self, code: str) -> None:
        """An error the session reported (to its client, or for a phone call, to the log)."""
        self.metrics.count_error(code)
        self.runtime.monitor.error(code)

    def final(self) -> SessionEnd:
        """The session's end, built once: the client (if told) and the database get these numbers."""
        if self._final is None:
            self.metrics.close_turns()  # the last turn's row is written now
            self._final = SessionEnd(
                session_id=self.session_id,
                reason=self.end_reason,
                duration=round(time.monotonic() - self.started_at, 3),
                summary=self.metrics.summary(),
            )
        return self._final

    def _record_end(self) -> None:
        end = self.final()
        row = self.info.end_row(end.summary, ended_at=self.info.started_at + end.duration, end_reason=end.reason)
        self.runtime.recorder.submit(SESSIONS, UPSERT, [row])
        self.runtime.monitor.session_ended(self.transport_name, end.reason, end.summary, self.info.cost(end.summary))
        if self.runtime.webhooks is not None:
            from storage.webhooks import WEBHOOKS, session_ended_event

            words = transcript(end.summary.turn_records) if self.info.store_transcripts else None
            self.runtime.webhooks.submit(WEBHOOKS, INSERT, [session_ended_event(row, words)])

    @property
    def who(self) -> str:
        """Who the caller is, for a resume: the verified user id, else the id the client gave."""
        return self.caller.user_id or f"client:{self.caller.client_user_id or ''}"

    @property
    def agent_name(self) -> str:
        assert self.agent is not None
        return self.agent.name

    # --- tools -------------------------------------------------------------------------------

    def tool_call(self) -> ToolCall:
        """What this session's tools are told and may do (bots/tools.py)."""
        assert self.agent is not None
        return ToolCall(
            session_id=self.session_id,
            agent=self.agent.name,
            door=self.transport_name,
            user_id=self.caller.user_id,
            end=self.end_call,
            transfer=self.transfer if self.can_transfer else None,
            transfer_number=self.agent.transfer_number,
        )

    can_transfer = False  # doors that can hand a call to a phone number override `transfer` and set this

    async def transfer(self, number: str) -> str | None:
        """Hand the call to `number`; None when done, else why not (spoken as an apology)."""
        return "this door cannot transfer calls"

    async def wait_reply_sent(self, timeout: float, quiet_secs: float = 0.8) -> None:
        """Wait (at most `timeout`) until the bot has been quiet for `quiet_secs`: the reply being spoken, and
        one about to start, has gone out."""
        called = time.monotonic()
        deadline = called + timeout
        while time.monotonic() < deadline:
            quiet_since = max(called, self.metrics.bot_quiet_since)
            if not self.metrics.bot_speaking and time.monotonic() - quiet_since >= quiet_secs:
                return
            await asyncio.sleep(0.05)

    async def end_call(self) -> None:
        """The agent hangs up (end_call): the reply before it is spoken to the end, then the session ends.

        An EndFrame queued at the pipeline's source follows the goodbye's text through the TTS and the output
        transport, so the session ends once the goodbye's audio has gone out; every door then closes its way
        (WebSocket: `session_end` and close; Twilio: the REST hang-up; Daily: the bot leaves the room)."""
        if self.worker is None or self.stopping:
            return
        self.stopping = True
        self.end_reason = "agent_ended"
        logger.info(f"session {self.session_id}: the agent ends the call")
        await self.worker.queue_frame(EndFrame())

        async def cut_if_stuck() -> None:
            await asyncio.sleep(END_CALL_GRACE_SECS)
            if self.worker is not None and not self.worker.has_finished():
                await self.worker.cancel(reason="agent_ended")

        task = asyncio.get_running_loop().create_task(cut_if_stuck())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def on_tool_failure(self, name: str, reason: str) -> None:
        """A tool raised or ran out of time: the caller hears an apology, the client gets TOOL_FAILED."""
        frame = coded_error(ErrorCode.TOOL_FAILED, f"the tool '{name}' failed; the conversation goes on", reason)
        await self.on_pipeline_error(frame)
        if self.worker is not None and not self.worker.has_finished():
            await self.worker.queue_frame(TTSSpeakFrame(TOOL_APOLOGY, append_to_context=False))

    # --- life --------------------------------------------------------------------------------

    async def on_cancel_before_start(self) -> None:
        """The session ends before its pipeline started (its transport's output never ran); doors whose
        clients expect a goodbye override this to send it now."""

    async def notify_limit(self, code: ErrorCode, message: str) -> None:
        """Tell the client why the session is ending (idle, max duration); doors override."""
        self.count_error(str(code))

    async def on_pipeline_error(self, frame) -> None:
        code = frame.code if isinstance(frame, CodedErrorFrame) else ErrorCode.PIPELINE_ERROR
        logger.warning(f"session {self.session_id}: pipeline error: {frame.error}")
        self.count_error(str(code))

    async def stop(self, reason: str, limit: tuple[ErrorCode, str] | None = None) -> None:
        """End the session once, for the first reason that comes (later ones are ignored)."""
        if self.worker is None or self.worker.has_finished() or self.stopping:
            return
        self.stopping = True
        self.end_reason = reason
        if not self.pipeline_started.is_set():
            # A cancel before the StartFrame has gone through (the STT still connecting) stops the
            # pipeline before the output transport starts, so it never writes session_end, and the
            # transport's cleanup closes the socket: give the start a few seconds, then let the door
            # say goodbye itself while the socket is still open.
            try:
                await asyncio.wait_for(self.pipeline_started.wait(), 5.0)
            except TimeoutError:
                pass
        if limit:
            await self.notify_limit(*limit)
        if not self.pipeline_started.is_set():
            await self.on_cancel_before_start()
        await self.worker.cancel(reason=reason)

    def stop_soon(self, reason: str, limit: tuple[ErrorCode, str] | None = None) -> None:
        """`stop` from another task: for callers inside the pipeline (a processor, the transport's receive
        loop), which the stop's cancel would otherwise wait on."""
        task = asyncio.get_running_loop().create_task(self.stop(reason, limit))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def on_backlog(self, lag_secs: float) -> None:
        """The pipeline fell `lag_secs` behind the caller's audio (called from inside it): end the session."""
        logger.warning(f"session {self.session_id}: {lag_secs:.1f} s behind its caller's audio; ending it")
        limit = self.runtime.settings.max_audio_lag_secs
        self.stop_soon(
            "audio_backlog",
            (ErrorCode.AUDIO_BACKLOG, f"the server fell more than {limit:g} s behind your audio; the session ended"),
        )

    async def on_flood(self) -> None:
        """The connection kept sending over twice its message rate (bots.limits.MessageRate.flooding): cut
        it off at once (every message read costs the server, even dropped unread), then end the session."""
        logger.warning(f"session {self.session_id}: message flood; ending it")
        self.end_reason = "message_flood"
        self.count_error(str(ErrorCode.MESSAGE_RATE_EXCEEDED))
        await self.cut_off(
            ErrorCode.MESSAGE_RATE_EXCEEDED,
            f"over twice {self.runtime.settings.max_messages_per_sec} messages a second for seconds; the session ended",
        )
        self.stop_soon("message_flood")

    async def cut_off(self, code: ErrorCode, message: str) -> None:
        """Tell the client why (doors that can) and close its socket now, ahead of the pipeline's end."""

    async def _watchdog(self) -> None:
        s = self.runtime.settings
        while True:
            await asyncio.sleep(min(1.0, s.session_idle_timeout_secs / 4))
            now = time.monotonic()
            if now - self.last_audio_at > s.session_idle_timeout_secs:
                await self.stop(
                    "idle_timeout", (ErrorCode.SESSION_IDLE_TIMEOUT, f"no audio for {s.session_idle_timeout_secs:g}s")
                )
                return
            if now - self.started_at > s.session_max_secs:
                await self.stop(
                    "max_duration", (ErrorCode.SESSION_MAX_DURATION, f"sessions last at most {s.session_max_secs:g}s")
                )
                return

    def make_worker(
        self, transport, *, observers=(), out_rate: int | None = None, rtvi: bool = False
    ) -> PipelineWorker:
        """The session's worker on the shared pipeline. `rtvi`: Pipecat's RTVI processor and observer join it
        (the doors of Pipecat's own clients), telling the client what happens as RTVI messages."""
        rt = self.runtime
        tracing = rt.settings.tracing  # the session's spans (monitoring/tracing.py)
        self.llm_slot = rt.claim_llm_slot(self.agent)  # returned when the session ends (run)
        built = build_pipeline(
            rt,
            transport,
            on_backlog=self.on_backlog,
            llm_slot=self.llm_slot,
            agent=self.agent,
            tool_call=self.tool_call(),
            on_tool_failure=self.on_tool_failure,
            speed=self.speed,
            history=self.history,
        )
        self.context = built.context
        self.worker = PipelineWorker(
            built.pipeline,
            params=PipelineParams(
                audio_in_sample_rate=CLIENT_SAMPLE_RATE,
                audio_out_sample_rate=out_rate or rt.output_sample_rate,
                enable_metrics=True,
                enable_usage_metrics=True,
            ),
            observers=[*observers, self.metrics],
            idle_timeout_secs=None,
            enable_rtvi=rtvi,
            rtvi_processor=SafeErrorsRTVIProcessor() if rtvi else None,
            # Our TurnMetricsObserver tracks turns: Pipecat's turn tracking, one observer more per frame, only
            # for ATLAS_TRACING, whose conversation and turn spans the services' spans hang from.
            enable_turn_tracking=tracing,
            enable_tracing=tracing,
            conversation_id=self.caller.conversation_id or self.session_id,
            additional_span_attributes=(
                {"session.id": self.session_id, "atlas.agent": self.agent_name, "atlas.door": self.transport_name}
                if tracing
                else None
            ),
        )

        select_frames(self.worker)  # observers get only the frame types they watch

        @self.worker.event_handler("on_pipeline_started")
        async def _on_started(_worker, _frame):
            self.pipeline_started.set()
            assert self.agent is not None
            if self.agent.greeting and not self.history:  # the agent speaks first (not again when resumed)
                await self.worker.queue_frame(TTSSpeakFrame(self.agent.greeting, append_to_context=False))

        @self.worker.event_handler("on_pipeline_error")
        async def _on_error(_worker, frame):
            await self.on_pipeline_error(frame)

        return self.worker

    async def run(self) -> None:
        """Run the worker made by `make_worker` until the session ends; record it whatever happens. Every line
        logged meanwhile, by Atlas or Pipecat (the tasks the run starts inherit the context), carries the
        session id (`session_id` in ATLAS_LOG_FORMAT=json)."""
        with logger.contextualize(session_id=self.session_id):
            await self._run()

    async def _run(self) -> None:
        rt = self.runtime
        runner = WorkerRunner(handle_sigint=False)
        assert self.worker is not None, "make_worker first"
        await runner.add_workers(self.worker)
        rt.recorder.submit(SESSIONS, INSERT, [self.info.start_row()])
        rt.monitor.session_started(self.transport_name)
        logger.info(
            f"{self.transport_name} session {self.session_id} started (user {self.describe_user()}, "
            f"agent {self.agent_name}{f', variant {self.variant}' if self.variant else ''})"
        )
        watchdog = asyncio.create_task(self._watchdog())
        rt.live[self.session_id] = self  # Runtime.drain ends it on SIGTERM
        try:
            await runner.run()
        finally:
            if self.resumable and self.context is not None:
                kept = self.context.get_messages()  # type: ignore[attr-defined]
                messages = [dict(m) for m in kept if isinstance(m, dict)][-RESUME_MESSAGES:]
                await rt.keep_for_resume(self.session_id, self.who, self.agent_name, messages)
            rt.live.pop(self.session_id, None)
            rt.return_llm_slot(self.llm_slot)
            self.llm_slot = None
            watchdog.cancel()
            self._record_end()
            summary = self.final().summary
            logger.info(
                f"{self.transport_name} session {self.session_id} ended ({self.end_reason}): {summary.turns} "
                f"turns, v2v p50 {summary.p50_latency_ms} ms p95 {summary.p95_latency_ms} ms"
            )
