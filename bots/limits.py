"""Abuse limits for the doors: sessions per IP and per user, session starts per minute, connections
that have not started a session yet, and, inside one connection, the rate of messages and the seconds
of audio (`AudioBudget`).

Pipecat has none of these (its FastAPI transport takes whatever arrives), and `ATLAS_MAX_SESSIONS`
only protects the process as a whole: one client opening 120 sockets would take every slot. The
limits here are per key (an IP address, a user id), kept in memory per process, and every refusal
is a documented error code (docs/PROTOCOL.md). A limit of 0 turns it off.

Behind a proxy the IP is the proxy's unless uvicorn trusts its X-Forwarded-For
(`FORWARDED_ALLOW_IPS`); see the README.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from vocabulary.errors import ErrorCode, ProtocolError

WINDOW_SECS = 60.0


@dataclass
class _Usage:
    active: int = 0
    starts: deque = field(default_factory=deque)  # monotonic times of the starts in the last window


def _prune(usage: _Usage, now: float) -> None:
    """Forget the starts that have left the 60 s window."""
    while usage.starts and now - usage.starts[0] >= WINDOW_SECS:
        usage.starts.popleft()


class KeyedLimit:
    """At most `max_active` at once and `max_per_minute` new ones in any 60 s, per key."""

    def __init__(self, what: str, max_active: int, max_per_minute: int, clock=time.monotonic):
        self.what = what
        self.max_active = max_active
        self.max_per_minute = max_per_minute
        self._clock = clock
        self._usage: dict[str, _Usage] = {}
        self._swept = clock()

    def acquire(self, key: str) -> None:
        """Take a slot for `key`, or raise ProtocolError (TOO_MANY_SESSIONS / RATE_LIMITED)."""
        now = self._clock()
        if now - self._swept >= WINDOW_SECS:  # once a minute: drop every key with nothing left
            self._swept = now
            for k, u in list(self._usage.items()):
                self._forget_if_idle(k, u)
        usage = self._usage.setdefault(key, _Usage())
        _prune(usage, now)
        if self.max_active and usage.active >= self.max_active:
            self._forget_if_idle(key, usage)
            raise ProtocolError(
                ErrorCode.TOO_MANY_SESSIONS,
                f"at most {self.max_active} sessions at once per {self.what}; end one first",
            )
        if self.max_per_minute and len(usage.starts) >= self.max_per_minute:
            retry = max(1, round(WINDOW_SECS - (now - usage.starts[0])))
            self._forget_if_idle(key, usage)
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"at most {self.max_per_minute} new sessions a minute per {self.what}; retry in {retry} s",
            )
        usage.active += 1
        if self.max_per_minute:
            usage.starts.append(now)

    def release(self, key: str) -> None:
        usage = self._usage.get(key)
        if usage is None:
            return
        usage.active = max(0, usage.active - 1)
        self._forget_if_idle(key, usage)

    def _forget_if_idle(self, key: str, usage: _Usage) -> None:
        # Keys with nothing live and no starts in the window are dropped: memory stays bounded by the
        # clients of the last minute, not every address ever seen.
        _prune(usage, self._clock())
        if usage.active == 0 and not usage.starts:
            self._usage.pop(key, None)

    @property
    def tracked_keys(self) -> int:
        return len(self._usage)


class AbuseLimits:
    """The per-IP and per-user limits of one process (settings: ATLAS_MAX_SESSIONS_PER_IP, ...).

    `pending` counts connections that have not proved who they are yet (no valid `session_start` or
    Twilio `start`): at most ATLAS_MAX_PENDING_PER_IP per address and ATLAS_MAX_PENDING_CONNECTIONS in
    all, so a stranger opening sockets and saying nothing cannot hold the server's session slots (a
    session slot is taken only once the client is authenticated)."""

    def __init__(self, settings, clock=time.monotonic):
        s = settings
        self.by_ip = KeyedLimit("IP address", s.max_sessions_per_ip, s.session_starts_per_minute_per_ip, clock)
        self.by_user = KeyedLimit("user", s.max_sessions_per_user, s.session_starts_per_minute_per_user, clock)
        self.pending = KeyedLimit("IP address", s.max_pending_per_ip, 0, clock)
        self.max_pending_total = s.max_pending_connections
        self.pending_total = 0

    def acquire_pending(self, ip: str) -> None:
        """Count a connection that has not started a session yet, or raise ProtocolError."""
        if self.max_pending_total and self.pending_total >= self.max_pending_total:
            raise ProtocolError(ErrorCode.SERVER_BUSY, "too many connections are waiting to start; retry shortly")
        try:
            self.pending.acquire(ip)
        except ProtocolError as e:
            raise ProtocolError(
                e.code,
                f"at most {self.pending.max_active} connections waiting to start "
                "per IP address; start or close one first",
            ) from None
        self.pending_total += 1

    def release_pending(self, ip: str) -> None:
        self.pending.release(ip)
        self.pending_total = max(0, self.pending_total - 1)


class _Bucket:
    """A token bucket: `rate` tokens a second up to `capacity`; `should_tell` is True at most once a second
    (the client is told about drops, not about each dropped message)."""

    def __init__(self, rate: float, capacity: float, clock):
        self._rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._clock = clock
        self._last = clock()
        self._told = float("-inf")

    def _take(self, amount: float) -> bool:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if amount <= self._tokens + 1e-9:  # sums of 20 ms frames are not exact in binary
            self._tokens -= amount
            return True
        return False

    def should_tell(self) -> bool:
        """True at most once a second while something is being dropped."""
        now = self._clock()
        if now - self._told >= 1.0:
            self._told = now
            return True
        return False


class MessageRate(_Bucket):
    """A token bucket over one connection's messages (audio and text): `per_sec` on average, bursts
    of `burst_secs` worth. A browser sends 50 audio messages a second; past the limit messages are
    dropped unread (no parsing, no pipeline work) and the client is told at most once a second.

    Even dropped unread, each message costs the server its WebSocket framing: one connection sending
    56,000 messages a second takes about 70% of a core. So a connection that has more
    than `FLOOD_SECS` seconds' worth of messages dropped within `FLOOD_SECS` seconds (over twice the
    rate, sustained) is `flooding`, and the door ends it."""

    FLOOD_SECS = 10.0

    def __init__(self, per_sec: int, burst_secs: float = 2.0, clock=time.monotonic):
        super().__init__(per_sec, per_sec * burst_secs, clock)
        self.per_sec = per_sec
        self.dropped = 0
        self._window_start = clock()
        self._window_drops = 0

    def allow(self) -> bool:
        if not self.per_sec:
            return True
        if self._take(1):
            return True
        self.dropped += 1
        now = self._clock()
        if now - self._window_start >= self.FLOOD_SECS:
            self._window_start, self._window_drops = now, 0
        self._window_drops += 1
        return False

    @property
    def flooding(self) -> bool:
        return self._window_drops > self.per_sec * self.FLOOD_SECS

    def refusal(self) -> ProtocolError:
        return ProtocolError(
            ErrorCode.MESSAGE_RATE_EXCEEDED,
            f"more than {self.per_sec} messages a second; {self.dropped} dropped so far",
        )


class AudioBudget(_Bucket):
    """Seconds of caller audio one connection may send: real time, plus a burst of `burst_secs`.

    The message rate counts messages, not their length: 150 messages of 64 KiB a second are 300
    seconds of audio a second, which the VAD, the STT (billed per audio second) and Whisper's
    re-transcribed partials would all have to take. A token bucket in audio seconds refills at
    `RATE` (5% over real time, so a sound card whose clock runs a little fast never runs dry over an
    hour); audio over it is dropped before any decoding and the caller is told at most once a
    second. An honest client (a browser, a phone line) sends in real time and never notices; a
    network stall that delivers its backlog at once fits in the burst. `burst_secs` 0 turns the
    budget off.
    """

    RATE = 1.05  # audio seconds per wall-clock second

    def __init__(self, burst_secs: float, clock=time.monotonic):
        super().__init__(self.RATE, burst_secs, clock)
        self.burst = burst_secs
        self.dropped_secs = 0.0

    def take(self, seconds: float) -> bool:
        if not self.burst or self._take(seconds):
            return True
        self.dropped_secs += seconds
        return False

    def refusal(self) -> ProtocolError:
        return ProtocolError(
            ErrorCode.AUDIO_RATE_EXCEEDED,
            f"audio is accepted at real time (bursts up to {self.burst:g} s); "
            f"{self.dropped_secs:.1f} s of audio dropped so far",
        )


class FailureThrottle:
    """Wrong credentials per IP address: at most `per_minute` in any 60 s (a moving window, the `limits`
    library in memory); past that the address is refused outright until the window has room again, so
    a token cannot be guessed by brute force. Used by the admin API and /metrics."""

    def __init__(self, per_minute: int):
        from limits import RateLimitItemPerMinute, storage, strategies

        self._item = RateLimitItemPerMinute(per_minute)
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def blocked(self, ip: str) -> float:
        """Seconds until `ip` may try again (0: it may try now)."""
        if self._limiter.test(self._item, "auth-failures", ip):
            return 0.0
        reset = self._limiter.get_window_stats(self._item, "auth-failures", ip).reset_time
        return max(1.0, reset - time.time())

    def failed(self, ip: str) -> None:
        self._limiter.hit(self._item, "auth-failures", ip)
