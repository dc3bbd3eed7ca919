"""Prometheus metrics and alerts for one server process (served at `GET /metrics`).

`Monitor` owns a private `CollectorRegistry` (never the global one, so several apps can live in one
process) and is fed by the session code:

* `session_started(transport)` / `session_ended(transport, end_reason, summary, cost_usd)`, once
  each per session, in that order (`summary`: vocabulary.records.SessionSummary);
* `turn_recorded(transport, turn)` when a turn is closed (a vocabulary.records.TurnRecord);
* `error(code)` for every `error` message a client is sent;
* `attach_recorder(recorder)` once per outbox (the rows', and the webhooks' when they are on); their
  numbers are read at scrape time, labelled by sink (`sqlite`/`supabase`, `webhook`).

Alerts (thresholds from the ATLAS_ALERT_* settings) are evaluated in process on every event and on
every scrape, logged once when they start firing and once when they resolve, and exported as
`atlas_alert_active{alert=...}` / `atlas_alerts_total{alert=...}`. The windowed alerts keep a deque of
(time, voice-to-voice, errored) per turn plus a sorted list of the window's voice-to-voice values,
so an event costs a prune, a `bisect.insort` and O(1) arithmetic. docs/MONITORING.md has the
full list of metrics and alerts; monitoring/alert_rules.yml has the same alerts as Prometheus rules.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from loguru import logger
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector

from vocabulary.records import STAGES, SessionSummary, TurnRecord, sorted_percentile

TRANSPORTS = ("websocket", "twilio", "daily", "webrtc", "rtvi_ws")
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
COST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ALERTS = ("p95_latency", "error_rate", "cost_per_session", "active_sessions", "satisfaction")
RATINGS = ("1", "2", "3", "4", "5")
SATISFIED, ISSUE = 4, 2  # a rating >= 4 is satisfied, <= 2 reported an issue (the plan's two feedback rates)
MIN_WINDOW_TURNS = 5  # the windowed alerts stay quiet (and resolve) below this many turns in the window


def _with(buckets: tuple[float, ...], extra: float) -> tuple[float, ...]:
    """The buckets plus the alert threshold, so `le="<threshold>"` is an exact bucket."""
    return tuple(sorted({*buckets, float(extra)})) if extra > 0 else buckets


def _num(value) -> float:
    """A usage number: None or negative counts as 0."""
    try:
        return max(0.0, float(value or 0))
    except (TypeError, ValueError):
        return 0.0


class _OutboxCollector:
    """The attached recorder's counters, read at scrape time."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def _families(self):
        return (
            GaugeMetricFamily(
                "atlas_outbox_pending", "Writes not yet in the store (in memory or in the outbox).", labels=["sink"]
            ),
            GaugeMetricFamily(
                "atlas_outbox_dead",
                "Dead letters kept: rows no store takes (`atlas-voice outbox list`).",
                labels=["sink"],
            ),
            CounterMetricFamily(
                "atlas_outbox_written", "Writes delivered to the store since the process started.", labels=["sink"]
            ),
            CounterMetricFamily(
                "atlas_outbox_failures", "Failed (transient) store writes since the process started.", labels=["sink"]
            ),
            CounterMetricFamily(
                "atlas_outbox_dead_lettered", "Rows dead-lettered since the process started.", labels=["sink"]
            ),
            CounterMetricFamily(
                "atlas_outbox_pruned",
                "Dead letters deleted (retention or disk cap) since the process started.",
                labels=["sink"],
            ),
            GaugeMetricFamily(
                "atlas_outbox_bytes",
                "Bytes of the outbox file in use (capped by ATLAS_OUTBOX_MAX_MB).",
                labels=["sink"],
            ),
            GaugeMetricFamily(
                "atlas_outbox_full",
                "1 while pending writes alone are over the disk cap (no new sessions).",
                labels=["sink"],
            ),
        )

    def describe(self):
        return self._families()

    def collect(self):
        recorders = self.monitor.recorders
        if not recorders:
            return
        families = self._families()
        attrs = ("pending", "dead", "written", "failures", "dead_lettered", "pruned", "bytes", "full")
        for recorder in recorders:  # the rows' (sink sqlite or supabase), and the webhooks' (sink webhook)
            sink = str(getattr(getattr(recorder, "sink", None), "name", None) or "unknown")
            for family, attr in zip(families, attrs, strict=True):
                family.add_metric([sink], _num(getattr(recorder, attr, 0)))
        yield from families


class _OutboxMirror:
    """The outbox numbers as ordinary metrics, for multiprocess mode (a custom collector would show only
    the worker that answers the scrape): gauges summed over the live workers, counters over all."""

    GAUGES = ("pending", "dead", "bytes", "full")
    COUNTERS = ("written", "failures", "dead_lettered", "pruned")

    def __init__(self, registry):
        help_ = {f.name: f.documentation for f in _OutboxCollector(None)._families()}  # type: ignore[arg-type]
        self.gauges = {
            a: Gauge(
                f"atlas_outbox_{a}",
                help_[f"atlas_outbox_{a}"],
                ["sink"],
                registry=registry,
                multiprocess_mode="livesum",
            )
            for a in self.GAUGES
        }
        self.counters = {
            a: Counter(f"atlas_outbox_{a}", help_[f"atlas_outbox_{a}"], ["sink"], registry=registry)
            for a in self.COUNTERS
        }
        self._seen: dict[tuple[str, str], float] = {}

    def update(self, recorder) -> None:
        sink = str(getattr(getattr(recorder, "sink", None), "name", None) or "unknown")
        for attr, gauge in self.gauges.items():
            gauge.labels(sink).set(_num(getattr(recorder, attr, 0)))
        for attr, counter in self.counters.items():
            value = _num(getattr(recorder, attr, 0))
            seen = self._seen.get((sink, attr), 0.0)
            if value > seen:
                counter.labels(sink).inc(value - seen)
                self._seen[sink, attr] = value


class Monitor:
    def __init__(self, settings, *, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.recorders: list = []  # the outboxes whose numbers /metrics shows (rows, webhooks)
        # Several worker processes (`atlas-voice serve --workers N`, which sets PROMETHEUS_MULTIPROC_DIR): the
        # metrics live in files shared by the workers and /metrics shows the machine's totals.
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        self.p95_threshold_ms = float(settings.alert_p95_ms)
        self.error_rate_threshold = float(settings.alert_error_rate)
        self.cost_threshold_usd = float(settings.alert_cost_per_session_usd)
        self.active_threshold = int(settings.alert_active_sessions)
        self.window_secs = float(settings.alert_window_secs)
        self.satisfaction_threshold = float(settings.alert_satisfaction)
        self.satisfaction_window_secs = float(settings.alert_satisfaction_window_secs)
        self.satisfaction_min_ratings = int(settings.alert_satisfaction_min_ratings)

        # With several workers (multiprocess mode) every gauge says how the workers' values combine: `livesum`
        # (the machine's total), `livemax` (any worker), `liveall` (one series per worker, labelled `pid`).
        self.active_sessions = Gauge(
            "atlas_active_sessions", "Sessions running now.", ["transport"], registry=r, multiprocess_mode="livesum"
        )
        self.worker_sessions = Gauge(
            "atlas_worker_sessions",
            "Sessions running now in each worker process (label pid; one series with a single process).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.worker_ready = Gauge(
            "atlas_worker_ready",
            "1 once a worker process has loaded its engines (label pid; one series with a single process).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.worker_starts = Counter(
            "atlas_worker_starts",
            "Worker processes that have loaded their engines: more than the workers means some were restarted.",
            registry=r,
        )
        self.capacity = Gauge(
            "atlas_capacity_sessions",
            "Sessions admitted at once: ATLAS_MAX_SESSIONS per worker, summed over the workers.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.capacity.set(int(settings.max_sessions))
        self.draining_gauge = Gauge(
            "atlas_draining",
            "1 while the server drains (SIGTERM: out of rotation, live calls finish).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.redis_errors = Counter(
            "atlas_redis_errors", "Shared-limit operations that failed on Redis, by operation.", ["op"], registry=r
        )
        self.limits_shared = Gauge(
            "atlas_limits_shared",
            "1 while the per-IP/per-user limits are shared through Redis, 0 while a process counts alone.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.limits_shared.set(1 if getattr(settings, "redis_url", None) else 0)
        self.sessions_started = Counter("atlas_sessions_started", "Sessions started.", ["transport"], registry=r)
        self.sessions_ended = Counter(
            "atlas_sessions_ended", "Sessions ended, by why they ended.", ["transport", "end_reason"], registry=r
        )
        self.stage_latency = Histogram(
            "atlas_stage_latency_seconds",
            "Per-turn latency of each stage (seconds); a turn that never reached a stage is not observed for it.",
            ["stage", "transport"],
            buckets=_with(LATENCY_BUCKETS, self.p95_threshold_ms / 1000.0),
            registry=r,
        )
        self.turns = Counter("atlas_turns", "Turns recorded.", ["transport"], registry=r)
        self.turns_errored = Counter(
            "atlas_turns_errored", "Turns during which the client was sent an error.", ["transport"], registry=r
        )
        self.interruptions = Counter(
            "atlas_interruptions", "Turns the user interrupted (barge-in).", ["transport"], registry=r
        )
        self.errors = Counter("atlas_errors", "`error` messages sent to clients, by code.", ["code"], registry=r)
        self.preempt_requests = Counter(
            "atlas_preempt_requests",
            "Preemptive LLM requests (asked for at a pause, before the turn ended), by outcome: `kept` (the reply "
            "spoken) or `withdrawn` (the caller went on).",
            ["transport", "outcome"],
            registry=r,
        )
        self.preempt_withdrawn_tokens = Counter(
            "atlas_preempt_withdrawn_input_tokens",
            "Input tokens carried by withdrawn preemptive requests (estimated from their messages).",
            ["transport"],
            registry=r,
        )
        self.provider_retries = Counter(
            "atlas_provider_retries",
            "Provider requests retried (the retry may still succeed), by why.",
            ["provider", "reason"],
            registry=r,
        )
        self.cost_total = Counter("atlas_cost_usd", "Estimated provider cost of ended sessions (USD).", registry=r)
        self.session_cost = Histogram(
            "atlas_session_cost_usd",
            "Estimated provider cost per ended session (USD).",
            buckets=_with(COST_BUCKETS, self.cost_threshold_usd),
            registry=r,
        )
        self.stt_seconds = Counter(
            "atlas_stt_audio_seconds", "Seconds of audio sent to STT (ended sessions).", registry=r
        )
        self.llm_input_tokens = Counter("atlas_llm_input_tokens", "LLM input tokens (ended sessions).", registry=r)
        self.llm_output_tokens = Counter("atlas_llm_output_tokens", "LLM output tokens (ended sessions).", registry=r)
        self.tts_characters = Counter("atlas_tts_characters", "Characters sent to TTS (ended sessions).", registry=r)
        self.feedback = Counter(
            "atlas_feedback",
            "Session ratings received (POST /feedback), by rating 1-5 and door: satisfied 4-5, an issue 1-2.",
            ["rating", "transport"],
            registry=r,
        )
        self.alert_active = Gauge(
            "atlas_alert_active",
            "1 while the alert is firing (in any worker), else 0.",
            ["alert"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.alerts_fired = Counter(
            "atlas_alerts", "Times the alert started firing in this process.", ["alert"], registry=r
        )
        self.alert_threshold = Gauge(
            "atlas_alert_threshold",
            "The configured threshold (p95_latency in seconds, error_rate as a fraction, "
            "cost_per_session in USD, active_sessions in sessions, satisfaction as a fraction).",
            ["alert"],
            registry=r,
            multiprocess_mode="livemax",
        )
        if self.multiprocess:
            # Each worker's outbox numbers, written to the shared files by `refresh_outbox` (every second and
            # at each scrape): the exposition sums them over the workers.
            self._outbox = _OutboxMirror(r)
        else:
            r.register(_OutboxCollector(self))
            ProcessCollector(registry=r)

        # Every label value known in advance is exported from the start (at 0), so rate() and the
        # alert rules see the series before the first event.
        for transport in TRANSPORTS:
            self.active_sessions.labels(transport)
            self.sessions_started.labels(transport)
            self.turns.labels(transport)
            self.turns_errored.labels(transport)
            self.interruptions.labels(transport)
            self.preempt_withdrawn_tokens.labels(transport)
            for outcome in ("kept", "withdrawn"):
                self.preempt_requests.labels(transport, outcome)
            for stage in STAGES:
                self.stage_latency.labels(stage.name, transport)
            for rating in RATINGS:
                self.feedback.labels(rating, transport)
        thresholds = {
            "p95_latency": self.p95_threshold_ms / 1000.0,
            "error_rate": self.error_rate_threshold,
            "cost_per_session": self.cost_threshold_usd,
            "active_sessions": self.active_threshold,
            "satisfaction": self.satisfaction_threshold,
        }
        for name in ALERTS:
            self.alert_active.labels(name).set(0)
            self.alerts_fired.labels(name)
            self.alert_threshold.labels(name).set(thresholds[name])

        self._lock = threading.Lock()
        self._ready = False
        self._active: dict[str, int] = {}
        self._alerts: dict[str, str] = {}  # firing alert -> message
        self._window: deque[tuple[float, float | None, bool]] = deque()  # (t, v2v ms, errored), oldest first
        self._v2v_sorted: list[float] = []  # the window's voice-to-voice values, ascending
        self._window_errored = 0
        self._ratings: deque[tuple[float, int]] = deque()  # (t, rating) within the satisfaction window

    # --- events ----------------------------------------------------------------------------------

    def attach_recorder(self, recorder) -> None:
        """Show this outbox's numbers in /metrics, labelled by its sink's name (several may be attached)."""
        if recorder not in self.recorders:
            self.recorders.append(recorder)

    @property
    def recorder(self):
        """The rows' outbox (the first attached)."""
        return self.recorders[0] if self.recorders else None

    def redis_error(self, op: str) -> None:
        self.redis_errors.labels(op).inc()
        self.limits_shared.set(0)

    def redis_ok(self) -> None:
        self.limits_shared.set(1)

    def draining(self, on: bool) -> None:
        self.draining_gauge.set(1 if on else 0)

    def session_started(self, transport: str) -> None:
        self.sessions_started.labels(transport).inc()
        self.active_sessions.labels(transport).inc()
        self.worker_sessions.inc()
        with self._lock:
            self._active[transport] = self._active.get(transport, 0) + 1
            self._evaluate_active()
            self._evaluate_window(self.clock())

    def session_ended(self, transport: str, end_reason: str, summary: SessionSummary, cost_usd: float) -> None:
        cost = _num(cost_usd)
        self.sessions_ended.labels(transport, str(end_reason)).inc()
        self.cost_total.inc(cost)
        self.session_cost.observe(cost)
        self.stt_seconds.inc(_num(summary.stt_seconds))
        self.llm_input_tokens.inc(_num(summary.usage.llm_input_tokens))
        self.llm_output_tokens.inc(_num(summary.usage.llm_output_tokens))
        self.tts_characters.inc(_num(summary.usage.tts_characters))
        with self._lock:
            if self._active.get(transport, 0) > 0:
                self._active[transport] -= 1
                self.active_sessions.labels(transport).dec()
                self.worker_sessions.dec()
            else:
                logger.warning(f"monitor: session_ended({transport!r}) without a session_started; gauge not changed")
            if cost > self.cost_threshold_usd:
                self._set_alert(
                    "cost_per_session",
                    True,
                    f"a {transport} session ({end_reason}) cost ${cost:.4f} > ${self.cost_threshold_usd:.2f}",
                )
            else:
                self._set_alert(
                    "cost_per_session", False, f"the last session cost ${cost:.4f} <= ${self.cost_threshold_usd:.2f}"
                )
            self._evaluate_active()
            self._evaluate_window(self.clock())

    def turn_recorded(self, transport: str, turn: TurnRecord) -> None:
        self.turns.labels(transport).inc()
        for stage in STAGES:
            ms = turn.stage(stage)
            if ms is not None:
                self.stage_latency.labels(stage.name, transport).observe(max(0.0, float(ms)) / 1000.0)
        if turn.interrupted:
            self.interruptions.labels(transport).inc()
        if turn.preempted:
            self.preempt_requests.labels(transport, "kept").inc()
        if turn.preempt_cancelled:
            self.preempt_requests.labels(transport, "withdrawn").inc(turn.preempt_cancelled)
            self.preempt_withdrawn_tokens.labels(transport).inc(turn.preempt_input_tokens)
        errored = turn.error_code is not None
        if errored:
            self.turns_errored.labels(transport).inc()
        v2v = None if turn.voice_to_voice_ms is None else max(0.0, float(turn.voice_to_voice_ms))
        with self._lock:
            now = self.clock()
            self._window.append((now, v2v, errored))
            if v2v is not None:
                bisect.insort(self._v2v_sorted, v2v)
            self._window_errored += errored
            self._evaluate_window(now)

    def feedback_recorded(self, transport: str, rating: int) -> None:
        """A session was rated (1-5): counted, and the satisfaction alert re-evaluated."""
        self.feedback.labels(str(rating), transport).inc()
        with self._lock:
            now = self.clock()
            self._ratings.append((now, rating))
            self._evaluate_satisfaction(now)

    def provider_retry(self, provider: str, reason: str) -> None:
        """A provider call that failed and was tried again: invisible to the caller when the retry works."""
        self.provider_retries.labels(provider, reason).inc()

    def error(self, code: str) -> None:
        self.errors.labels(str(code)).inc()
        with self._lock:
            self._evaluate_window(self.clock())

    def render(self) -> tuple[bytes, str]:
        with self._lock:
            self._evaluate_window(self.clock())  # windows expire even when no events come
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.refresh_outbox()
        machine = CollectorRegistry()
        MultiProcessCollector(machine)
        return generate_latest(machine), CONTENT_TYPE_LATEST

    def refresh_outbox(self) -> None:
        """Multiprocess mode: copy this worker's outbox numbers to the shared files."""
        if self.multiprocess:
            for recorder in self.recorders:
                self._outbox.update(recorder)

    def ready(self) -> None:
        self._ready = True
        self.worker_ready.set(1)
        self.worker_starts.inc()

    def workers(self) -> dict[str, tuple[bool, int]]:
        """Each live worker's (engines loaded, sessions running), by pid: every worker's in multiprocess mode,
        read from the shared files; this process's alone otherwise."""
        if not self.multiprocess:
            return {str(os.getpid()): (self._ready, int(sum(self._active.values())))}
        machine = CollectorRegistry()
        MultiProcessCollector(machine)
        found: dict[str, list] = {}
        for family in machine.collect():
            if family.name in ("atlas_worker_ready", "atlas_worker_sessions"):
                for sample in family.samples:
                    entry = found.setdefault(sample.labels.get("pid", ""), [False, 0])
                    if family.name == "atlas_worker_ready":
                        entry[0] = sample.value >= 1
                    else:
                        entry[1] = int(sample.value)
        return {pid: (ready, sessions) for pid, (ready, sessions) in found.items()}

    def active_alerts(self) -> dict[str, str]:
        """Firing alerts -> their last message (the windowed ones are re-evaluated first)."""
        with self._lock:
            self._evaluate_window(self.clock())
            return dict(self._alerts)

    # --- alerts (called with self._lock held) -----------------------------------------------------

    def _set_alert(self, name: str, firing: bool, message: str) -> None:
        was = name in self._alerts
        if firing:
            self._alerts[name] = message
            if not was:
                self.alert_active.labels(name).set(1)
                self.alerts_fired.labels(name).inc()
                logger.warning(f"ALERT {name} firing: {message}")
        elif was:
            del self._alerts[name]
            self.alert_active.labels(name).set(0)
            logger.info(f"ALERT {name} resolved: {message}")

    def _evaluate_active(self) -> None:
        active = sum(self._active.values())
        self._set_alert(
            "active_sessions",
            active > self.active_threshold,
            f"{active} active sessions (threshold {self.active_threshold})",
        )

    def _evaluate_satisfaction(self, now: float) -> None:
        ratings, horizon = self._ratings, now - self.satisfaction_window_secs
        while ratings and ratings[0][0] < horizon:
            ratings.popleft()
        span = f"the last {self.satisfaction_window_secs:g} s"
        n, least, threshold = len(ratings), self.satisfaction_min_ratings, self.satisfaction_threshold
        if n < least:
            self._set_alert("satisfaction", False, f"{n} ratings in {span} (fewer than {least})")
            return
        satisfied = sum(1 for _, rating in ratings if rating >= SATISFIED)
        rate = satisfied / n
        self._set_alert(
            "satisfaction",
            rate < threshold,
            f"{satisfied}/{n} ratings satisfied (4-5) over {span} ({rate:.1%}), threshold {threshold:.0%}",
        )

    def _evaluate_window(self, now: float) -> None:
        self._evaluate_satisfaction(now)
        window, horizon = self._window, now - self.window_secs
        while window and window[0][0] < horizon:
            _, v2v, errored = window.popleft()
            if v2v is not None:
                del self._v2v_sorted[bisect.bisect_left(self._v2v_sorted, v2v)]
            self._window_errored -= errored
        span = f"the last {self.window_secs:g} s"

        timed = len(self._v2v_sorted)
        if timed >= MIN_WINDOW_TURNS:
            p95 = sorted_percentile(self._v2v_sorted, 95) or 0.0
            self._set_alert(
                "p95_latency",
                p95 > self.p95_threshold_ms,
                f"p95 voice-to-voice {p95:.0f} ms over {span} ({timed} turns), threshold {self.p95_threshold_ms:g} ms",
            )
        else:
            self._set_alert("p95_latency", False, f"{timed} timed turns in {span} (fewer than {MIN_WINDOW_TURNS})")

        turns = len(window)
        if turns >= MIN_WINDOW_TURNS:
            rate = self._window_errored / turns
            self._set_alert(
                "error_rate",
                rate > self.error_rate_threshold,
                f"{self._window_errored}/{turns} turns with an error over {span} ({rate:.1%}), "
                f"threshold {self.error_rate_threshold:.1%}",
            )
        else:
            self._set_alert("error_rate", False, f"{turns} turns in {span} (fewer than {MIN_WINDOW_TURNS})")
