"""Abuse limits for the browser door: sessions per IP and per user, session starts per minute,
and the rate of messages inside one connection.

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

from transports.protocol import ErrorCode, ProtocolError

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
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS,
                                f"at most {self.max_active} sessions at once per {self.what}; end one first")
        if self.max_per_minute and len(usage.starts) >= self.max_per_minute:
            retry = max(1, round(WINDOW_SECS - (now - usage.starts[0])))
            self._forget_if_idle(key, usage)
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"at most {self.max_per_minute} new sessions a minute per {self.what}; "
                                f"retry in {retry} s")
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
    """The per-IP and per-user limits of one process (settings: ATLAS_MAX_SESSIONS_PER_IP, ...)."""

    def __init__(self, settings, clock=time.monotonic):
        s = settings
        self.by_ip = KeyedLimit("IP address", s.max_sessions_per_ip, s.session_starts_per_minute_per_ip, clock)
        self.by_user = KeyedLimit("user", s.max_sessions_per_user, s.session_starts_per_minute_per_user, clock)


class MessageRate:
    """A token bucket over one connection's messages (audio and text): `per_sec` on average, bursts
    of `burst_secs` worth. A browser sends 50 audio messages a second; past the limit messages are
    dropped unread (no parsing, no pipeline work) and the client is told at most once a second."""

    def __init__(self, per_sec: int, burst_secs: float = 2.0, clock=time.monotonic):
        self.per_sec = per_sec
        self.capacity = per_sec * burst_secs
        self._tokens = self.capacity
        self._clock = clock
        self._last = clock()
        self._told = float("-inf")
        self.dropped = 0

    def allow(self) -> bool:
        if not self.per_sec:
            return True
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.per_sec)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.dropped += 1
        return False

    def should_tell(self) -> bool:
        """True at most once a second while messages are being dropped."""
        now = self._clock()
        if now - self._told >= 1.0:
            self._told = now
            return True
        return False

    def refusal(self) -> ProtocolError:
        return ProtocolError(ErrorCode.MESSAGE_RATE_EXCEEDED,
                             f"more than {self.per_sec} messages a second; {self.dropped} dropped so far")
