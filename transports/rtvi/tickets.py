"""Start tickets: what `POST /start` hands a Pipecat client, and the WebRTC offer or the RTVI socket redeems."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid

import jwt

from vocabulary.errors import ErrorCode, ProtocolError

TICKET_AUDIENCE = "atlas:start"
MAX_TICKET_CHARS = 2048
KINDS = ("webrtc", "websocket")


class StartTickets:
    """Signed, short-lived, single-use tickets for one session of one door (`webrtc` or `websocket`).

    A JWT (PyJWT, HS256) with the caller's verified user id (`sub`, empty without auth), the agent, the door
    (`kind`), a `jti` and an `exp` ATLAS_SESSION_START_TIMEOUT_SECS away. The key is derived from
    ATLAS_START_TICKET_SECRET (random per process when unset), so a ticket is redeemed in whichever process the
    client's next request reaches when they share the secret. A redeemed `jti` is remembered until it expires:
    a ticket starts one session per process (the per-user and per-IP limits, shared through Redis when
    configured, bound what a copied ticket could do in another).
    """

    def __init__(self, secret_key: str, ttl_secs: float):
        seed = secret_key.encode() if secret_key else secrets.token_bytes(32)
        self._key = hmac.new(seed, b"atlas start ticket v1", hashlib.sha256).digest()
        self._ttl = ttl_secs
        self._used: dict[str, float] = {}

    def issue(self, kind: str, user_id: str | None, agent: str | None, speed: float = 1.0) -> str:
        assert kind in KINDS
        now = time.time()
        claims = {
            "aud": TICKET_AUDIENCE,
            "kind": kind,
            "sub": user_id or "",
            "agent": agent or "",
            "speed": speed,
            "iat": int(now),
            "exp": int(now + self._ttl) + 1,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm="HS256")

    def check(self, ticket, kind: str) -> dict:
        """The ticket's claims if it is signed by this server, unexpired and for `kind`; else ProtocolError
        (AUTH_FAILED, with a message safe to show)."""
        if not isinstance(ticket, str) or not ticket or len(ticket) > MAX_TICKET_CHARS:
            raise ProtocolError(ErrorCode.AUTH_FAILED, "no start ticket: POST /start first")
        try:
            claims = jwt.decode(
                ticket,
                self._key,
                algorithms=["HS256"],
                audience=TICKET_AUDIENCE,
                options={"require": ["exp", "jti", "kind"]},
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError(ErrorCode.AUTH_FAILED, "the start ticket has expired: POST /start again") from None
        except jwt.InvalidTokenError:
            raise ProtocolError(ErrorCode.AUTH_FAILED, "the start ticket is not valid: POST /start again") from None
        if claims["kind"] != kind:
            raise ProtocolError(ErrorCode.AUTH_FAILED, f"the start ticket is not for the {kind} door")
        return claims

    def redeem(self, ticket, kind: str) -> dict:
        """`check`, and the ticket may not be redeemed again (in this process)."""
        claims = self.check(ticket, kind)
        now = time.time()
        for jti in [j for j, exp in self._used.items() if exp < now]:
            del self._used[jti]
        if claims["jti"] in self._used:
            raise ProtocolError(ErrorCode.AUTH_FAILED, "the start ticket was used already: POST /start again")
        self._used[claims["jti"]] = float(claims["exp"])
        return claims
