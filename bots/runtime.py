"""Process-wide state: loaded once at start-up, shared by every session.

`Runtime` holds the engines, the local LLM server, the recorder (outbox and store), the monitor, the
token verifier, the abuse limits and the session count; every door admits sessions through it and
`build_pipeline` builds each session's pipeline from it. On SIGTERM, `drain` takes the process out of
rotation and lets the live sessions finish.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from loguru import logger

from bots.agents import agent_settings, engine_needs, load_agent_config
from bots.auth import TokenVerifier
from bots.limits import AbuseLimits
from bots.rollout import Rollout, rollout_from_settings
from bots.tokens import FeedbackTokens, ResumeTokens
from config.agents import Agent, Agents
from config.settings import Settings, secret
from monitoring.metrics import Monitor
from monitoring.tracing import shutdown_tracing, start_tracing
from services.local.engines import LocalEngines
from services.local.llama_server import LlamaServer
from storage import make_recorder
from storage.outbox import Recorder
from storage.resume import ResumeStore
from storage.webhooks import make_webhook_recorder
from vocabulary.errors import SHUTTING_DOWN_MESSAGE, ErrorCode


class Runtime:
    """Process-wide state: loaded once at start-up, shared by every session."""

    def __init__(
        self,
        settings: Settings,
        *,
        recorder: Recorder | None = None,
        monitor: Monitor | None = None,
        limits: AbuseLimits | None = None,
    ):
        self.settings = settings
        self.recorder: Recorder = recorder or make_recorder(settings)
        self.monitor: Monitor = monitor or Monitor(settings)
        if monitor is None:
            self.monitor.attach_recorder(self.recorder)
        self.limits: AbuseLimits = limits or AbuseLimits(settings, monitor=self.monitor)  # per IP / user / pending
        self.auth: TokenVerifier = TokenVerifier.from_settings(settings)
        # Agents and their tools: checked here, so a bad file or an unknown tool stops the server at start-up.
        self.agents: Agents = load_agent_config(settings)
        self.rollout: Rollout = rollout_from_settings(settings, self.agents)  # who gets which agent (bots/rollout.py)
        self._agent_settings: dict[str, Settings] = {}
        # `session.ended` events for ATLAS_WEBHOOK_URL, through their own outbox (storage/webhooks.py).
        self.webhooks: Recorder | None = make_webhook_recorder(settings)
        if self.webhooks is not None:
            self.monitor.attach_recorder(self.webhooks)  # atlas_outbox_*{sink="webhook"}
        self.engines: LocalEngines | None = None  # set by `load`
        self.tracing = False  # set by `load`: this process's spans are exported (ATLAS_TRACING)
        self.llm_base_url: str | None = None
        self.llm_model = "local"
        self.llm_server: LlamaServer | None = None
        # The local llama-server's slots not held by a session (see `max_sessions`, `claim_llm_slot`).
        self.free_llm_slots: list[int] = []
        self.ready = asyncio.Event()
        self.load_error: str | None = None
        self.sessions = 0  # admitted sessions, every door (the ATLAS_MAX_SESSIONS cap)
        self.tasks: set[asyncio.Task] = set()  # background sessions (Daily bots)
        self.live: dict[str, Any] = {}  # running VoiceSessions by id, every door (drained on shutdown)
        self.twilio_tokens: Any = None  # transports.twilio.tokens.StreamTokens, made on first use
        # What lets a client rate a session it had (session_end's feedbackToken; bots/feedback.py).
        self.feedback_tokens = FeedbackTokens(secret(settings.session_token_secret))
        # What lets a dropped client resume its conversation (session_started's resumeToken; bots/session.py).
        self.resume_tokens = ResumeTokens(
            secret(settings.session_token_secret), settings.session_max_secs + settings.resume_window_secs
        )
        # Ended conversations a client may resume, shared by the processes its reconnection may reach.
        self.resume_store = ResumeStore(
            settings.resume_store_path, getattr(self.limits, "redis", None), getattr(settings, "redis_prefix", "atlas")
        )
        self._rated: dict[str, float] = {}  # session id -> when this process first counted its rating
        self.shutting_down = False
        self._drain_cut = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None

    async def keep_for_resume(self, session_id: str, who: str, agent: str, messages: list[dict]) -> None:
        """Keep an ended conversation's messages for ATLAS_RESUME_WINDOW_SECS, for a client that resumes it (in
        whichever process its reconnection lands: storage/resume.py)."""
        await self.resume_store.keep(session_id, who, agent, messages, self.settings.resume_window_secs)

    async def take_resumable(self, session_id: str, who: str) -> tuple[str, list[dict]] | None:
        """An ended conversation's (agent, messages), once, if `who` had it and the window is still open."""
        return await self.resume_store.take(session_id, who)

    def first_rating(self, session_id: str) -> bool:
        """Whether this is the first rating of the session this process sees (within a day; at most 100 000
        remembered): /metrics counts a session once, however often its rating is posted."""
        now = time.monotonic()
        # Kept in the order they came (a dict's order), so the oldest, the first to go, is always the first key.
        while self._rated and (len(self._rated) >= 100_000 or next(iter(self._rated.values())) < now - 86400):
            del self._rated[next(iter(self._rated))]
        if session_id in self._rated:
            return False
        self._rated[session_id] = now
        return True

    def agent_settings(self, agent: Agent) -> Settings:
        """The settings a session of `agent` runs with: the server's, with the agent's providers and voice."""
        if agent.name not in self._agent_settings:
            self._agent_settings[agent.name] = agent_settings(self.settings, agent)
        return self._agent_settings[agent.name]

    @property
    def session_agents_use_local_llm(self) -> bool:
        return any(self.agent_settings(a).resolved_llm == "llama" for a in self.agents.by_name.values())

    def track(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def http(self) -> aiohttp.ClientSession:
        """One aiohttp session per process for REST calls to vendors (Daily), with a short timeout."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.db_timeout_secs * 2))
        return self._http

    @property
    def output_sample_rate(self) -> int:
        voice = getattr(self.engines, "piper_voice", None)
        return voice.config.sample_rate if voice is not None else 22050

    @property
    def local_llm_sessions(self) -> bool:
        """Sessions talk to this process's own llama-server (not Claude, not another server's URL)."""
        return self.llm_server is not None and self.session_agents_use_local_llm

    @property
    def max_sessions(self) -> int:
        """Sessions admitted at once: ATLAS_MAX_SESSIONS, and no more than the local LLM's slots when the
        sessions talk to it (a session past the slots would wait for another's reply and evict its cache)."""
        if self.local_llm_sessions:
            return min(self.settings.max_sessions, self.settings.llm_slots)
        return self.settings.max_sessions

    def busy_message(self) -> str:
        """Why a session is refused at the cap, for the client (SERVER_BUSY)."""
        if self.local_llm_sessions and self.settings.llm_slots < self.settings.max_sessions:
            return (
                f"the local LLM is serving its limit of conversations ({self.settings.llm_slots}, "
                "ATLAS_LLM_SLOTS); retry later"
            )
        return f"this server is at its limit of {self.settings.max_sessions} sessions; retry later"

    def claim_llm_slot(self, agent: Agent | None = None) -> int | None:
        """A llama-server slot for a new session's conversation, or None (not the local LLM, or none free:
        the server then picks a slot itself)."""
        uses_local = agent is None or self.agent_settings(agent).resolved_llm == "llama"
        if not self.local_llm_sessions or not uses_local or not self.free_llm_slots:
            return None
        return self.free_llm_slots.pop(0)

    def return_llm_slot(self, slot: int | None) -> None:
        if slot is not None and slot not in self.free_llm_slots:
            self.free_llm_slots.append(slot)

    def can_admit(self) -> bool:
        """Whether a new session would be admitted now (at the session cap, shutting down, or the
        outbox over its disk cap: no)."""
        if self.shutting_down or self.sessions >= self.max_sessions:
            return False
        return not self.recorder.full

    def admit(self) -> bool:
        """Take a session slot, or False when the process is at its session cap (`max_sessions`), shutting
        down, or its outbox is over ATLAS_OUTBOX_MAX_MB (sessions wait until the store takes the backlog)."""
        if self.shutting_down:
            return False
        if self.sessions >= self.max_sessions:
            logger.warning(f"session refused: at the limit of {self.max_sessions} sessions")
            return False
        if self.recorder.full:
            logger.warning("session refused: the outbox is over ATLAS_OUTBOX_MAX_MB until the store catches up")
            return False
        self.sessions += 1
        return True

    def release(self) -> None:
        self.sessions -= 1

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        runtime = cls(settings=settings)
        await runtime.start_recorder()
        await runtime.load()
        return runtime

    async def start_recorder(self) -> None:
        """Open the outbox and start sending rows (first those a previous run left behind)."""
        await self.recorder.start()
        if self.webhooks is not None:
            await self.webhooks.start()
            logger.info("session.ended webhooks go to ATLAS_WEBHOOK_URL (signed; retried from their own outbox)")
        self.limits.start()
        logger.info(
            f"recording sessions to {self.recorder.sink.name}"
            + (f" ({self.settings.resolved_sqlite_path})" if self.recorder.sink.name == "sqlite" else "")
        )

    async def load(self) -> None:
        """Load engines (in a thread: seconds of model loading) and start the local LLM if used.

        Piper is always loaded: it is every cloud voice's fallback. Whisper only when it is the STT.
        With Claude, the local LLM is its fallback (ATLAS_LLM_FALLBACK=local, the default).
        """
        s = self.settings
        try:
            s.check_providers()
            logger.info(f"providers: stt={s.resolved_stt} llm={s.resolved_llm} tts={s.resolved_tts}")
            for agent in self.agents.by_name.values():
                try:
                    self.agent_settings(agent).check_providers()
                except ValueError as e:
                    raise ValueError(f"{self.agents.source}: agents.{agent.name}: {e}") from None
            if self.agents.source:
                logger.info(
                    f"agents from {self.agents.source}: {', '.join(self.agents.names)} (default {self.agents.default})"
                )
            self.tracing = start_tracing(s)  # ATLAS_TRACING: the process's tracer provider (monitoring/tracing.py)
            needs = engine_needs(s, self.agents)
            self.engines = await asyncio.to_thread(
                LocalEngines.load, stt=needs.whisper, smart_turn=s.smart_turn, cache_dir=s.cache_dir
            )
            if s.llm_url and needs.local_llm:
                self.llm_base_url, self.llm_model = s.llm_url, s.llm_model_name
            elif needs.openai:
                raise ValueError("ATLAS_LLM=openai needs ATLAS_LLM_URL")
            elif needs.local_llm:
                from services.local.models import resolve_llm_path

                path = await asyncio.to_thread(resolve_llm_path, s.llm_model_path, s.cache_dir, False)
                server = LlamaServer(
                    path,
                    threads=s.llm_threads,
                    context_tokens=s.llm_context_tokens,
                    slots=s.llm_slots,
                    cache_reuse_tokens=s.llm_cache_reuse_tokens,
                    binary=s.llama_server,
                )
                await server.start()
                default = self.agents.get(None)
                if self.agent_settings(default).resolved_llm == "llama":  # the sessions' own LLM: warm first turns
                    await server.warm_slots(default.system_prompt(local_model=True))
                self.llm_server, self.llm_base_url, self.llm_model = server, server.base_url, "local"
                self.free_llm_slots = list(range(server.slots))
            self.ready.set()
            self.monitor.ready()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            logger.exception(f"Engine loading failed: {e}")
            raise

    def readiness(self) -> tuple[str, int, int]:
        """For /readyz: (state, sessions running, sessions admitted at once), for the machine when there are
        several workers (their shared metric files are read once).

        The state is `ready` (admits a new session now), else why not: `loading`, `error` (the engines failed;
        the cause is in the log), `draining`, `full` (at the session cap, `max_sessions`) or `backlogged` (the outbox is
        over its disk cap)."""
        max_sessions = self.max_sessions
        workers = list(self.monitor.workers().values()) if self.monitor.multiprocess else []
        if workers:
            sessions, capacity = sum(n for _, n in workers), max_sessions * len(workers)
        else:
            sessions, capacity = self.sessions, max_sessions
        return self._state(workers), sessions, capacity

    def _state(self, workers: list[tuple[bool, int]]) -> str:
        if self.shutting_down:
            return "draining"
        if not self.ready.is_set():
            return "error" if self.load_error else "loading"
        if self.sessions >= self.max_sessions:
            return "full"
        if self.monitor.multiprocess:
            # The port's next connection may land on any worker: the machine is ready when all of them are
            # (every worker up and loaded, none full). Workers fill evenly, so little capacity waits unused.
            if len(workers) < self.settings.resolved_workers or not all(ready for ready, _ in workers):
                return "loading"
            if any(sessions >= self.settings.max_sessions for _, sessions in workers):
                return "full"
        if self.recorder.full:
            return "backlogged"
        return "ready"

    def end_drain_now(self) -> None:
        """A second SIGTERM: stop waiting for the live sessions to end by themselves. Called from a signal
        handler, so the event is set by the loop itself."""
        try:
            asyncio.get_running_loop().call_soon_threadsafe(self._drain_cut.set)
        except RuntimeError:  # no loop running: nothing is draining yet
            self._drain_cut.set()

    async def drain(self, drain_secs: float, grace_secs: float) -> int:
        """Graceful shutdown, first half, as a rolling deploy needs it.

        1. Leave rotation: /readyz answers 503 and every door refuses new sessions (`SERVER_SHUTTING_DOWN`).
        2. Let the live sessions go on until each ends by itself, for at most `drain_secs` (or until
           `end_drain_now`, a second SIGTERM).
        3. End those still live: each client gets `SERVER_SHUTTING_DOWN` and `session_end`, its rows go
           to the outbox; wait up to `grace_secs` for them to finish.

        Returns how many were still running at the end."""
        self.shutting_down = True
        self.monitor.draining(True)
        loop = asyncio.get_running_loop()
        if self.live and drain_secs > 0 and not self._drain_cut.is_set():
            logger.info(f"draining: {len(self.live)} live session(s) may go on for up to {drain_secs:g} s")
            deadline = loop.time() + drain_secs
            while self.live and loop.time() < deadline and not self._drain_cut.is_set():
                try:
                    await asyncio.wait_for(self._drain_cut.wait(), min(0.2, max(0.0, deadline - loop.time())))
                except TimeoutError:
                    pass
        if self.live:
            why = "a second signal" if self._drain_cut.is_set() else "the drain's deadline"
            logger.info(f"shutting down ({why}): ending {len(self.live)} live session(s) (grace {grace_secs:g} s)")
        deadline = loop.time() + grace_secs
        while self.live and loop.time() < deadline:
            # Again each pass: a session admitted just before the signal joins `live` a moment later.
            stops = [
                session.stop("server_shutdown", (ErrorCode.SERVER_SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE))
                for session in list(self.live.values())
                if not session.stopping
            ]
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
        if self.webhooks is not None:
            await self.webhooks.close(timeout=self.settings.db_timeout_secs)
        await self.limits.close()
        if self.tracing:
            await asyncio.to_thread(shutdown_tracing)  # the spans still queued are sent
        logger.info("shutdown complete")
