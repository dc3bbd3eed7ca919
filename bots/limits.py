"""Abuse limits for the doors: sessions per IP and per user, session starts per minute, connections
that have not started a session yet, and, inside one connection, the rate of messages and the seconds
of audio (`AudioBudget`).

Pipecat has none of these (its FastAPI transport takes whatever arrives), and `ATLAS_MAX_SESSIONS`
only protects the process as a whole: one client opening 25 sockets would take every slot. The
limits here are per key (an IP address, a user id), kept in memory per process or, with REDIS_URL,
in Redis for every worker and node; every refusal is a documented error code (docs/PROTOCOL.md). A
limit of 0 turns it off.

Behind a proxy the IP is the proxy's unless uvicorn trusts its X-Forwarded-For
(`FORWARDED_ALLOW_IPS`); see the README.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from loguru import logger
from redis.exceptions import RedisError

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

    async def acquire(self, key: str) -> None:
        """Take a slot for `key`, or raise ProtocolError (TOO_MANY_SESSIONS / RATE_LIMITED)."""
        self.take(key)

    def take(self, key: str) -> None:
        """`acquire`, synchronously (this process's own counts)."""
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


# Both checks and the take in one atomic step on Redis's clock. KEYS: the key's live leases (a sorted set,
# score = expiry) and its starts in the window (score = start time). ARGV: max live, max starts per window,
# the lease id, the lease's lifetime, the window. Returns {1, 0} taken, {0, 0} too many live, {-1, retry secs}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local max_live, per_window = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl, window = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if max_live > 0 and redis.call('ZCARD', KEYS[1]) >= max_live then return {0, 0} end
if per_window > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if redis.call('ZCARD', KEYS[2]) >= per_window then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {-1, math.max(1, math.ceil(window - (now - tonumber(oldest[2]))))}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('EXPIRE', KEYS[2], math.ceil(window) + 1)
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) * 2)
return {1, 0}
"""

# Keeps this process's live leases alive: KEYS[i] holds lease ARGV[i + 1]; ARGV[1] is the lifetime. A lease
# that ran out while Redis was unreachable is added back: the session it counts is still live.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('EXPIRE', key, math.ceil(ttl) * 2)
end
return #KEYS
"""


class SharedKeyedLimit:
    """`KeyedLimit` held in Redis, so it holds across every worker process and machine (REDIS_URL).

    Each live session is a lease in a sorted set per key, scored by its expiry: a process renews its
    leases every `LEASE_SECS / 3`, so the slots of a worker killed mid-call (SIGKILL, OOM, a lost node)
    come free within `LEASE_SECS` instead of leaking forever. The starts of the last minute are a second
    sorted set. One Lua script checks both and takes the slot atomically, on Redis's clock.

    Written here rather than with the `limits` library: it has moving-window rates on Redis but no
    concurrent count (a live session is not a hit that expires on its own), and one script does both
    checks in one round trip, with no start counted for a session refused as one too many.

    When Redis fails or is slower than ATLAS_REDIS_TIMEOUT_SECS, `redis_failure` decides: `open` counts the
    session in this process's own `KeyedLimit` (still bounded, per process), `closed` refuses it with
    LIMITS_UNAVAILABLE. Either way it is counted (`atlas_redis_errors_total`) and live sessions go on.
    """

    LEASE_SECS = 30.0
    _LOCAL = ""  # a slot held in the local fallback, not in Redis

    def __init__(
        self,
        name: str,
        local: KeyedLimit,
        client,
        *,
        prefix: str,
        failure: str,
        timeout: float,
        monitor=None,
    ):
        self.what = local.what
        self.max_active = local.max_active
        self.max_per_minute = local.max_per_minute
        self.local = local
        self._client = client
        self._prefix = f"{prefix}:limit:{name}"
        self._failure = failure
        self._timeout = timeout
        self._monitor = monitor
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, list[str]] = {}  # key -> lease ids (or _LOCAL) this process holds
        self._tasks: set = set()

    def _keys(self, key: str) -> tuple[str, str]:
        # Hashed: Redis keys stay short whatever a client sends, and hold no address or phone number.
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return f"{self._prefix}:{digest}:live", f"{self._prefix}:{digest}:starts"

    def _failed(self, op: str, error: BaseException) -> None:
        logger.warning(f"shared limits: Redis {op} failed ({type(error).__name__}: {error})")
        if self._monitor is not None:
            self._monitor.redis_error(op)

    async def acquire(self, key: str) -> None:
        if not self.max_active and not self.max_per_minute:
            return
        lease = uuid.uuid4().hex
        live, starts = self._keys(key)
        try:
            taken, retry = await asyncio.wait_for(
                self._acquire(
                    keys=[live, starts],
                    args=[self.max_active, self.max_per_minute, lease, self.LEASE_SECS, WINDOW_SECS],
                ),
                self._timeout,
            )
        except (RedisError, OSError, TimeoutError) as e:
            self._failed("acquire", e)
            if self._failure == "closed":
                raise ProtocolError(
                    ErrorCode.LIMITS_UNAVAILABLE, "the server cannot check its limits right now; retry shortly"
                ) from None
            self.local.take(key)
            self._held.setdefault(key, []).append(self._LOCAL)
            return
        if self._monitor is not None:
            self._monitor.redis_ok()
        if int(taken) == 0:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SESSIONS,
                f"at most {self.max_active} sessions at once per {self.what}; end one first",
            )
        if int(taken) < 0:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"at most {self.max_per_minute} new sessions a minute per {self.what}; retry in {int(retry)} s",
            )
        self._held.setdefault(key, []).append(lease)

    def release(self, key: str) -> None:
        """Give back one of `key`'s slots (synchronous for the callers; Redis is told in the background, and a
        lease Redis never hears about expires by itself)."""
        leases = self._held.get(key)
        if not leases:
            return
        lease = leases.pop()
        if not leases:
            del self._held[key]
        if lease == self._LOCAL:
            self.local.release(key)
            return
        task = asyncio.get_running_loop().create_task(self._forget(self._keys(key)[0], lease))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forget(self, live: str, lease: str) -> None:
        try:
            await asyncio.wait_for(self._client.zrem(live, lease), self._timeout)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed("release", e)

    async def renew(self) -> None:
        """Push this process's leases' expiry on (called every LEASE_SECS / 3)."""
        pairs = [(self._keys(k)[0], lease) for k, leases in self._held.items() for lease in leases if lease]
        if not pairs:
            return
        try:
            await asyncio.wait_for(
                self._renew(keys=[k for k, _ in pairs], args=[self.LEASE_SECS, *[lease for _, lease in pairs]]),
                self._timeout,
            )
        except (RedisError, OSError, TimeoutError) as e:
            self._failed("renew", e)

    @property
    def tracked_keys(self) -> int:
        return len(self._held) + self.local.tracked_keys


class AbuseLimits:
    """The per-IP and per-user limits (settings: ATLAS_MAX_SESSIONS_PER_IP, ...): this process's own counts,
    or with REDIS_URL the counts of every worker and node (`SharedKeyedLimit`).

    `pending` counts connections that have not proved who they are yet (no valid `session_start` or
    Twilio `start`): at most ATLAS_MAX_PENDING_PER_IP per address and ATLAS_MAX_PENDING_CONNECTIONS in
    all, so a stranger opening sockets and saying nothing cannot hold the server's session slots (a
    session slot is taken only once the client is authenticated)."""

    def __init__(self, settings, clock=time.monotonic, monitor=None):
        s = settings
        by_ip = KeyedLimit("IP address", s.max_sessions_per_ip, s.session_starts_per_minute_per_ip, clock)
        by_user = KeyedLimit("user", s.max_sessions_per_user, s.session_starts_per_minute_per_user, clock)
        self.by_ip: KeyedLimit | SharedKeyedLimit = by_ip
        self.by_user: KeyedLimit | SharedKeyedLimit = by_user
        self.redis = None
        self._renewer: asyncio.Task | None = None
        self._prefix = getattr(s, "redis_prefix", "atlas")
        self._failure = getattr(s, "redis_failure", "open")
        self._timeout = getattr(s, "redis_timeout_secs", 0.5)
        self._monitor = monitor
        redis_url = getattr(s, "redis_url", None)
        if redis_url is not None and redis_url.get_secret_value():
            from redis.asyncio import Redis

            self.redis = Redis.from_url(
                redis_url.get_secret_value(),
                socket_timeout=s.redis_timeout_secs,
                socket_connect_timeout=s.redis_timeout_secs,
            )
            shared = {"prefix": s.redis_prefix, "failure": s.redis_failure, "timeout": s.redis_timeout_secs}
            self.by_ip = SharedKeyedLimit("ip", by_ip, self.redis, monitor=monitor, **shared)
            self.by_user = SharedKeyedLimit("user", by_user, self.redis, monitor=monitor, **shared)
        # Connections still to start a session are this process's own sockets: counted here only.
        self.pending = KeyedLimit("IP address", s.max_pending_per_ip, 0, clock)
        self.max_pending_total = s.max_pending_connections
        self.pending_total = 0

    async def first_use(self, name: str, ttl_secs: float = 3600.0) -> bool:
        """Whether this is the first use of `name` on any worker or node (with Redis; without it the caller's
        own per-process check is all there is, and this says True). Remembered for `ttl_secs`. Redis down:
        True with ATLAS_REDIS_FAILURE=open (the per-process check still holds), False with `closed`."""
        if self.redis is None:
            return True
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        try:
            first = await asyncio.wait_for(
                self.redis.set(f"{self._prefix}:once:{digest}", 1, nx=True, ex=max(1, int(ttl_secs))), self._timeout
            )
        except (RedisError, OSError, TimeoutError) as e:
            logger.warning(f"shared limits: Redis first_use failed ({type(e).__name__}: {e})")
            if self._monitor is not None:
                self._monitor.redis_error("first_use")
            return self._failure == "open"
        return bool(first)

    def start(self) -> None:
        """Start renewing the shared leases (with Redis; call from the running event loop)."""
        if self.redis is not None and self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(SharedKeyedLimit.LEASE_SECS / 3)
            for limit in (self.by_ip, self.by_user):
                if isinstance(limit, SharedKeyedLimit):
                    await limit.renew()

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()

    def acquire_pending(self, ip: str) -> None:
        """Count a connection that has not started a session yet, or raise ProtocolError."""
        if self.max_pending_total and self.pending_total >= self.max_pending_total:
            raise ProtocolError(ErrorCode.SERVER_BUSY, "too many connections are waiting to start; retry shortly")
        try:
            self.pending.take(ip)
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
