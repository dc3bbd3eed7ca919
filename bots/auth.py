"""Verify the Supabase access token a client sends in `session_start.authToken`.

With SUPABASE_JWT_SECRET (HS256, Supabase's legacy shared secret) or SUPABASE_JWKS_URL (the
project's asymmetric signing keys, `<SUPABASE_URL>/auth/v1/.well-known/jwks.json`) set, a session
starts only with a token whose signature, expiry and audience check out, and the session's user
is the token's `sub`, never the client's `userId`. With neither set, auth is off (a warning at
start-up says so) and sessions are anonymous.
"""

from __future__ import annotations

import asyncio

import jwt
from loguru import logger

from config.settings import Settings, secret


class AuthError(Exception):
    """A token that does not let this session start; the message is safe to show the client."""


class TokenVerifier:
    def __init__(self, *, secret_key: str = "", jwks_url: str | None = None, audience: str = "authenticated",
                 leeway: float = 10.0):
        self._secret = secret_key
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True) if jwks_url else None
        self._audience = audience
        self._leeway = leeway

    @classmethod
    def from_settings(cls, s: Settings) -> "TokenVerifier":
        verifier = cls(secret_key=secret(s.supabase_jwt_secret), jwks_url=s.supabase_jwks_url,
                       audience=s.jwt_audience)
        if not verifier.enabled:
            logger.warning("auth is OFF: set SUPABASE_JWT_SECRET or SUPABASE_JWKS_URL to require a Supabase "
                           "access token in session_start (sessions are anonymous until then)")
        return verifier

    @property
    def enabled(self) -> bool:
        return bool(self._secret or self._jwks)

    async def verify(self, token: str | None) -> str:
        """The verified user id (`sub`), or AuthError."""
        if not token:
            raise AuthError("authToken is required: send a Supabase access token")
        try:
            if self._jwks is not None:
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
                algorithms = ["RS256", "ES256", "EdDSA"]
            else:
                key, algorithms = self._secret, ["HS256"]
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=self._audience, leeway=self._leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the access token has expired; refresh it and reconnect") from None
        except jwt.InvalidAudienceError:
            raise AuthError("the access token is not for this audience") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"the access token has no '{e.claim}' claim") from None
        except jwt.PyJWKClientError:
            raise AuthError("the access token's signing key is unknown") from None
        except jwt.InvalidTokenError:
            raise AuthError("the access token is invalid (bad format or signature)") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("the access token has no user ('sub')")
        return sub
