"""Tokens Atlas hands its clients, signed by the server: start tickets (`POST /start`, transports/rtvi) and
feedback tokens (a session's `feedbackToken`, for `POST /feedback`).

Each is a JWT (PyJWT, HS256) whose key is derived from ATLAS_SESSION_TOKEN_SECRET and the token's purpose, so a
token of one kind is never accepted as another, and the secret itself never signs anything. With the secret unset
each process makes a random one (`serve --workers N` makes one for its workers); several machines behind one
balancer need the same value. Every failure is a ProtocolError `AUTH_FAILED` whose message is safe to show.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid

import jwt

from vocabulary.errors import ErrorCode, ProtocolError

MAX_TOKEN_CHARS = 2048
FEEDBACK_TOKEN_SECS = 24 * 3600  # a rating may come the next day


class SignedTokens:
    """Signed, expiring tokens of one purpose (`audience`); `redeem` also makes each usable once per process."""

    def __init__(self, secret_key: str, audience: str, ttl_secs: float):
        seed = secret_key.encode() if secret_key else secrets.token_bytes(32)
        self._key = hmac.new(seed, f"atlas {audience} v1".encode(), hashlib.sha256).digest()
        self.audience = audience
        self.ttl = ttl_secs
        self._used: dict[str, float] = {}

    def issue(self, claims: dict) -> str:
        now = time.time()
        body = {**claims, "aud": self.audience, "iat": int(now), "exp": int(now + self.ttl) + 1}
        return jwt.encode({**body, "jti": uuid.uuid4().hex}, self._key, algorithm="HS256")

    def check(self, token, what: str, again: str) -> dict:
        """The token's claims if this server signed it for this purpose and it has not expired; else ProtocolError
        naming `what` it is and what to do `again`."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise ProtocolError(ErrorCode.AUTH_FAILED, f"no {what}: {again}")
        try:
            return jwt.decode(
                token, self._key, algorithms=["HS256"], audience=self.audience, options={"require": ["exp", "jti"]}
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError(ErrorCode.AUTH_FAILED, f"the {what} has expired: {again}") from None
        except jwt.InvalidTokenError:
            raise ProtocolError(ErrorCode.AUTH_FAILED, f"the {what} is not valid: {again}") from None

    def spend(self, claims: dict, what: str, again: str) -> None:
        """Mark a checked token used; ProtocolError if it was (in this process) already."""
        now = time.time()
        for jti in [j for j, exp in self._used.items() if exp < now]:
            del self._used[jti]
        if claims["jti"] in self._used:
            raise ProtocolError(ErrorCode.AUTH_FAILED, f"the {what} was used already: {again}")
        self._used[claims["jti"]] = float(claims["exp"])


class FeedbackTokens:
    """What lets a client rate one session it had: the session id, its user and its door, for
    FEEDBACK_TOKEN_SECS. Not single-use: a later rating of the same session replaces the earlier one."""

    WHAT, AGAIN = "feedback token", "use the feedbackToken of this session's session_end"

    def __init__(self, secret_key: str):
        self._tokens = SignedTokens(secret_key, "atlas:feedback", FEEDBACK_TOKEN_SECS)

    def issue(self, session_id: str, user_id: str | None, door: str) -> str:
        return self._tokens.issue({"sub": session_id, "uid": user_id or "", "door": door})

    def check(self, token, session_id) -> tuple[str | None, str]:
        """The session's user id (None: anonymous) and door, if `token` lets its holder rate `session_id`."""
        claims = self._tokens.check(token, self.WHAT, self.AGAIN)
        if not isinstance(session_id, str) or claims.get("sub") != session_id:
            raise ProtocolError(ErrorCode.AUTH_FAILED, f"the {self.WHAT} is for another session")
        return claims.get("uid") or None, str(claims.get("door") or "websocket")


class ResumeTokens:
    """What lets a client that lost its connection resume the conversation in a new session (session_start
    `resume`): the session id, who it was (the verified user id, else the client's userId) and how many times it
    was resumed already. Issued in `session_started`; valid for the session's maximum length and then the resume
    window; single-use (per process)."""

    WHAT, AGAIN = "resume token", "start a new session"

    def __init__(self, secret_key: str, ttl_secs: float):
        self._tokens = SignedTokens(secret_key, "atlas:resume", ttl_secs)

    def issue(self, session_id: str, who: str, reconnects: int) -> str:
        return self._tokens.issue({"sub": session_id, "who": who, "n": reconnects})

    def redeem(self, token, session_id, who: str) -> int:
        """How many reconnects the session had, if `token` lets `who` resume `session_id` (then never again);
        else ProtocolError RESUME_FAILED."""
        try:
            claims = self._tokens.check(token, self.WHAT, self.AGAIN)
            if not isinstance(session_id, str) or claims.get("sub") != session_id:
                raise ProtocolError(ErrorCode.RESUME_FAILED, f"the {self.WHAT} is for another session")
            if claims.get("who") != who:
                raise ProtocolError(ErrorCode.RESUME_FAILED, f"the {self.WHAT} is another user's")
            self._tokens.spend(claims, self.WHAT, self.AGAIN)
        except ProtocolError as e:
            raise ProtocolError(ErrorCode.RESUME_FAILED, e.message) from None
        return int(claims.get("n") or 0)
