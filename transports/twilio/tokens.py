"""Single-use tokens that tie a Twilio media stream to a call the signed voice webhook announced."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid

import jwt

from vocabulary.errors import ErrorCode, ProtocolError

TOKEN_PARAMETER = "atlasToken"  # the <Parameter> of the TwiML's <Stream> that carries it
TOKEN_AUDIENCE = "atlas:twilio-stream"
MAX_PARAMETER_CHARS = 500  # Twilio's limit on a <Parameter>'s name and value together


class StreamTokens:
    """Single-use tokens that tie a media stream to a call the signed webhook announced.

    A JWT (PyJWT, HS256) whose key is derived from TWILIO_AUTH_TOKEN (so it changes when the token is
    rotated, and never is the token itself), with the CallSid as `sub`, the caller's number, a `jti`
    and a short `exp`. Used `jti`s are remembered until they expire, so a token opens one stream.
    """

    def __init__(self, auth_token: str, ttl_secs: float):
        self._key = hmac.new(auth_token.encode(), b"atlas twilio stream token v1", hashlib.sha256).digest()
        self._ttl = ttl_secs
        self._used: dict[str, float] = {}

    def issue(self, call_sid: str, caller: str | None) -> str:
        now = time.time()
        claims = {
            "sub": call_sid,
            "aud": TOKEN_AUDIENCE,
            "iat": int(now),
            "exp": int(now + self._ttl) + 1,
            "jti": uuid.uuid4().hex,
            "from": caller or "",
        }
        return jwt.encode(claims, self._key, algorithm="HS256")

    def redeem(self, token, call_sid: str) -> dict:
        """The token's claims if it is valid, unused and for `call_sid`; else ProtocolError."""
        if not isinstance(token, str) or len(token) > MAX_PARAMETER_CHARS:
            raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, "no stream token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=TOKEN_AUDIENCE,
                options={"require": ["exp", "sub", "jti"]},
            )
        except jwt.InvalidTokenError as e:
            raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, f"bad stream token ({type(e).__name__})") from None
        if claims["sub"] != call_sid:
            raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, "the stream token is for another call")
        now = time.time()
        for jti in [j for j, exp in self._used.items() if exp < now]:
            del self._used[jti]
        if claims["jti"] in self._used:
            raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, "the stream token was used already")
        self._used[claims["jti"]] = float(claims["exp"])
        return claims
