"""Signed webhooks: a `session.ended` event POSTed to ATLAS_WEBHOOK_URL at the end of each session.

Events go through their own outbox (`outbox.webhooks.sqlite3` next to the rows' outbox), so a slow
or failing receiver never delays the database rows, and an event is not lost when the receiver is
down or the server restarts. The receiver's contract is docs/WEBHOOKS.md:

* Each POST is signed like Stripe's: `Atlas-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
  "<t>." + body>` with ATLAS_WEBHOOK_SECRET, signed again at each attempt (a fresh `t`). `verify()`
  is what a receiver does.
* `Atlas-Event-Id` is the event's id, the same on every attempt (a uuid5 of the session id), so a
  receiver can drop a repeat.
* 2xx is delivered. 5xx, 408, 429, timeouts and connection errors are retried by the outbox (0.5 s
  doubling to ATLAS_OUTBOX_MAX_BACKOFF_SECS) until the event is ATLAS_WEBHOOK_MAX_AGE_HOURS old,
  then dead-lettered; any other status (4xx, a redirect) dead-letters it at once with the status and
  the start of the answer. Dead letters are listed and sent again by `atlas-voice outbox --webhooks`.

Working around the Recorder (storage/outbox.py, which is made for database batches): it hands the
sink up to 200 events at once and, after a failure, sends the same events again (the whole batch
after a transient fault; each row alone after a permanent one). So the sink remembers the events it
delivered (`_delivered`) and skips them when they come back, and remembers a refusal for the row-by-
row pass that follows it (`_refused`), so a receiver sees each event once per real attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path

import httpx
from loguru import logger

from config.settings import Settings, secret
from storage.outbox import Recorder
from storage.records import iso
from storage.sinks import PermanentWriteError, Sink, TransientWriteError

WEBHOOKS = "webhooks"  # the outbox's table name for events
SESSION_ENDED = "session.ended"
SIGNATURE_HEADER = "Atlas-Signature"
EVENT_ID_HEADER = "Atlas-Event-Id"
EVENT_HEADER = "Atlas-Event"
USER_AGENT = "atlas-voice"
TOLERANCE_SECS = 300.0  # how far a receiver lets a signature's timestamp be from its own clock
RETRY_STATUSES = frozenset({408, 429})  # and every 5xx
BODY_EXCERPT = 200  # characters of a refusing receiver's answer kept in the dead letter's reason

# Event ids: uuid5 of the session id in this namespace (the same session always gives the same id).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://atlas-voice/webhooks")
_REMEMBERED = 1000  # delivered event ids kept (the Recorder's batches are 200)
_REFUSAL_SECS = 60.0  # a refusal is reused only by the row-by-row pass that follows it
_TIMESTAMP = re.compile(r"\d{1,12}")


# --- signing ---------------------------------------------------------------------------------------


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `Atlas-Signature` header value: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify(
    secret: str, header: str, body: bytes, tolerance_secs: float = TOLERANCE_SECS, now: float | None = None
) -> bool:
    """What a receiver does with a POST: True when `header` (the `Atlas-Signature` value) signs `body` (the raw
    bytes received, before any JSON parsing) with `secret`, and its timestamp is within `tolerance_secs` of
    `now` (default: the clock), either way, so a captured request cannot be replayed later. Compares in
    constant time; any `v1=` may match (several are allowed, e.g. while a secret is rotated). Never raises."""
    if not secret or not header:
        return False
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if not _TIMESTAMP.fullmatch(value):
                return False
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_secs:
        return False
    expected = _digest(secret, timestamp, body).encode()
    return any(hmac.compare_digest(expected, s.encode("utf-8", "replace")) for s in signatures)


# --- events ----------------------------------------------------------------------------------------


def event_id(session_id: str) -> str:
    """The `session.ended` event's id for a session: stable, so every attempt carries the same one."""
    return str(uuid.uuid5(_NAMESPACE, f"{SESSION_ENDED}/{session_id}"))


def session_ended_event(session_row: dict, transcript: list[dict] | None) -> dict:
    """The event for a session that ended: `session_row` is its final voice_sessions row
    (`SessionInfo.end_row`), `transcript` its turns as `{"turn", "user", "bot"}` or None when the agent keeps
    no transcripts (then the event has no "transcript" key)."""
    data: dict = {"session": dict(session_row)}
    if transcript is not None:
        data["transcript"] = [dict(t) for t in transcript]
    return {
        "id": event_id(str(session_row["id"])),
        "type": SESSION_ENDED,
        "created_at": iso(time.time()),
        "data": data,
    }


def _created_at(event: dict) -> float | None:
    try:
        created = datetime.fromisoformat(str(event["created_at"]))
    except (KeyError, TypeError, ValueError):
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return created.timestamp()


def encode(event: dict) -> bytes:
    """The body sent (and signed): compact UTF-8 JSON."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# --- delivery --------------------------------------------------------------------------------------


class WebhookSink(Sink):
    """POSTs each row (one event) to `url`, signed with `secret`. Raises TransientWriteError for what may work
    later (5xx, 408, 429, a timeout, a refused or dropped connection) until the event is `max_age_hours`
    old, then PermanentWriteError; PermanentWriteError at once for any other answer that is not 2xx."""

    name = "webhook"

    def __init__(self, url: str, secret: str, *, timeout_secs: float = 5.0, max_age_hours: float = 24.0):
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("ATLAS_WEBHOOK_URL must be an http:// or https:// URL")
        if not secret:
            raise ValueError("a webhook needs a secret (ATLAS_WEBHOOK_SECRET)")
        self.url = url
        self._secret = secret
        self.timeout_secs = timeout_secs
        self.max_age_secs = max_age_hours * 3600
        self._client: httpx.AsyncClient | None = None
        self._delivered: OrderedDict[str, None] = OrderedDict()
        self._refused: dict[str, tuple[str, float]] = {}

    def __repr__(self) -> str:  # never the secret, nor the URL's path (it may hold a token)
        return f"WebhookSink({httpx.URL(self.url).host})"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_secs), follow_redirects=False, headers={"User-Agent": USER_AGENT}
            )
        return self._client

    async def write(self, table: str, mode: str, rows: list[dict]) -> None:
        if table != WEBHOOKS:
            raise PermanentWriteError(f"{table}: the webhook outbox takes only {WEBHOOKS!r} rows")
        for event in rows:  # in order; the Recorder sends the batch again from the start after a fault
            await self._deliver(event)

    async def _deliver(self, event: dict) -> None:
        eid = event.get("id")
        created = _created_at(event)
        if not isinstance(eid, str) or not eid or created is None or not isinstance(event.get("type"), str):
            raise PermanentWriteError("not a webhook event (it needs a string id and type, and an ISO created_at)")
        if eid in self._delivered:
            return
        refused = self._refused.pop(eid, None)
        if refused is not None and time.monotonic() - refused[1] < _REFUSAL_SECS:
            raise PermanentWriteError(refused[0])
        try:
            await self._post(eid, event)
        except PermanentWriteError as e:
            self._refused[eid] = (str(e), time.monotonic())
            raise
        except TransientWriteError as e:
            age = time.time() - created
            if age <= self.max_age_secs:
                raise
            reason = (
                f"not delivered {age / 3600:.1f} h after it was made (ATLAS_WEBHOOK_MAX_AGE_HOURS="
                f"{self.max_age_secs / 3600:g}); last attempt: {e}"
            )
            self._refused[eid] = (reason, time.monotonic())
            raise PermanentWriteError(reason) from e
        self._delivered[eid] = None
        while len(self._delivered) > _REMEMBERED:
            self._delivered.popitem(last=False)

    async def _post(self, eid: str, event: dict) -> None:
        body = encode(event)
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: eid,
            EVENT_HEADER: str(event["type"]),
            SIGNATURE_HEADER: sign(self._secret, int(time.time()), body),
        }
        try:
            async with asyncio.timeout(self.timeout_secs):
                async with self._http().stream("POST", self.url, content=body, headers=headers) as response:
                    status = response.status_code
                    head = b""
                    if not 200 <= status < 300:
                        async for chunk in response.aiter_bytes():
                            head += chunk
                            if len(head) >= 4 * BODY_EXCERPT:
                                break
        except TimeoutError as e:
            raise TransientWriteError(f"no answer within {self.timeout_secs:g} s") from e
        except httpx.TimeoutException as e:
            raise TransientWriteError(f"no answer within {self.timeout_secs:g} s ({type(e).__name__})") from e
        except (httpx.HTTPError, OSError) as e:
            raise TransientWriteError(f"{type(e).__name__}: {e}") from e
        if 200 <= status < 300:
            logger.debug(f"webhook: event {eid} delivered (HTTP {status})")
            return
        if status >= 500 or status in RETRY_STATUSES:
            raise TransientWriteError(f"HTTP {status}")
        text = " ".join(head.decode("utf-8", "replace")[:BODY_EXCERPT].split())
        note = " (redirects are not followed: set the final URL)" if 300 <= status < 400 else ""
        raise PermanentWriteError(f"HTTP {status}{note}: {text}")

    async def fetch(self, table: str, since: str | None = None) -> list[dict]:
        return []  # events are sent, not kept

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception as e:
                logger.debug(f"closing the webhook client: {e}")
            self._client = None


# --- wiring ----------------------------------------------------------------------------------------


def webhook_outbox_path(settings: Settings) -> Path:
    """The webhooks' own outbox, next to the rows' one: `outbox.sqlite3` -> `outbox.webhooks.sqlite3`
    (`outbox.worker1.webhooks.sqlite3` in worker 1)."""
    path = settings.resolved_outbox_path
    return path.with_name(f"{path.stem}.{WEBHOOKS}{path.suffix}")


def make_webhook_recorder(settings: Settings) -> Recorder | None:
    """The recorder that delivers webhooks (submit `(WEBHOOKS, INSERT, [event])`), or None without
    ATLAS_WEBHOOK_URL. Not started: the caller awaits `start()` and, at shutdown, `close()`."""
    if not settings.webhook_url:
        return None
    sink = WebhookSink(
        settings.webhook_url,
        secret(settings.webhook_secret),
        timeout_secs=settings.webhook_timeout_secs,
        max_age_hours=settings.webhook_max_age_hours,
    )
    return Recorder(
        sink,
        webhook_outbox_path(settings),
        max_backoff_secs=settings.outbox_max_backoff_secs,
        max_bytes=int(settings.outbox_max_mb * (1 << 20)),
        dead_retention_secs=settings.dead_letter_retention_days * 86400,
    )
