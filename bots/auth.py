"""Verify the Supabase access token a client presents (`session_start.authToken`, or a Bearer header).

Keys: SUPABASE_JWT_SECRET (HS256, Supabase's legacy shared secret) and/or SUPABASE_JWKS_URL (the
project's asymmetric signing keys, `<SUPABASE_URL>/auth/v1/.well-known/jwks.json`). Both may be set
at once, as during Supabase's key rotation: a token is checked with the key its own header's `alg`
names (HS256 -> the secret, RS256/ES256/EdDSA -> the JWKS), never with whichever comes first.

A token is accepted only when its signature, expiry, audience (ATLAS_JWT_AUDIENCE) and issuer
(ATLAS_JWT_ISSUER, by default `<SUPABASE_URL>/auth/v1`) check out, its `role` is `authenticated`
(an `anon` or `service_role` key is not a user), it is not an anonymous sign-in (`is_anonymous`,
unless ATLAS_JWT_ALLOW_ANONYMOUS_USERS), and its `sub` is a user id (a UUID). The session's user is
that `sub`, never what the client claims. Anything else, including tokens too malformed for PyJWT to
classify, is an `AuthError` whose message is safe to show the client.

With neither key set, auth is off (a warning at start-up says so; `serve` refuses a non-loopback
address then unless ATLAS_ALLOW_ANONYMOUS=true).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import jwt
from loguru import logger

from config.settings import Settings, secret

ASYMMETRIC = ("RS256", "ES256", "EdDSA")
MAX_TOKEN_CHARS = 8192


class AuthError(Exception):
    """A token that does not let this session start; the message is safe to show the client."""


class TokenVerifier:
    def __init__(
        self,
        *,
        secret_key: str = "",
        jwks_url: str | None = None,
        audience: str = "authenticated",
        issuer: str | None = None,
        allow_anonymous_users: bool = False,
        leeway: float = 10.0,
    ):
        self._secret = secret_key
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, timeout=5) if jwks_url else None
        self._audience = audience
        self._issuer = issuer
        self._allow_anonymous_users = allow_anonymous_users
        self._leeway = leeway

    @classmethod
    def from_settings(cls, s: Settings) -> TokenVerifier:
        verifier = cls(
            secret_key=secret(s.supabase_jwt_secret),
            jwks_url=s.supabase_jwks_url,
            audience=s.jwt_audience,
            issuer=s.resolved_jwt_issuer,
            allow_anonymous_users=s.jwt_allow_anonymous_users,
        )
        if not verifier.enabled:
            logger.warning(
                "auth is OFF: set SUPABASE_JWT_SECRET or SUPABASE_JWKS_URL to require a Supabase "
                "access token in session_start (sessions are anonymous until then)"
            )
        elif not verifier._issuer:
            logger.warning("auth: no token issuer to check (set ATLAS_JWT_ISSUER or SUPABASE_URL)")
        return verifier

    @property
    def enabled(self) -> bool:
        return bool(self._secret or self._jwks)

    async def _key(self, token: str) -> tuple[Any, list[str]]:
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if alg == "HS256" and self._secret:
            return self._secret, ["HS256"]
        if alg in ASYMMETRIC and self._jwks is not None:
            if not isinstance(header.get("kid"), str):
                raise AuthError("the access token names no signing key ('kid')")
            return (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key, [alg]
        raise AuthError("the access token is signed with an algorithm this server does not accept")

    async def verify(self, token: str | None) -> str:
        """The verified user id (`sub`), or AuthError."""
        if not token or not isinstance(token, str):
            raise AuthError("authToken is required: send a Supabase access token")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("the access token is invalid (too long)")
        try:
            key, algorithms = await self._key(token)
            options: Any = {"require": ["exp", "sub"] + (["iss"] if self._issuer else [])}
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,
            )
        except AuthError:
            raise
        except jwt.ExpiredSignatureError:
            raise AuthError("the access token has expired; refresh it and reconnect") from None
        except jwt.InvalidAudienceError:
            raise AuthError("the access token is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("the access token was issued by another project") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"the access token has no '{e.claim}' claim") from None
        except jwt.PyJWKClientError:
            raise AuthError("the access token's signing key is unknown") from None
        except jwt.InvalidTokenError:
            raise AuthError("the access token is invalid (bad format or signature)") from None
        except Exception as e:  # a header PyJWT cannot even classify: still a refusal, never a 500
            logger.info(f"auth: unclassified token error {type(e).__name__}")
            raise AuthError("the access token is invalid (bad format)") from None
        return self._user(claims)

    def _user(self, claims: dict) -> str:
        if claims.get("role") != "authenticated":
            raise AuthError("the access token is not a signed-in user's (role must be 'authenticated')")
        if claims.get("is_anonymous") is True and not self._allow_anonymous_users:
            raise AuthError("anonymous sign-ins may not start sessions here; sign in with an account")
        sub = claims.get("sub")
        if isinstance(sub, str):
            try:
                return str(uuid.UUID(sub))
            except ValueError:
                pass
        raise AuthError("the access token has no user id ('sub' must be a Supabase user id)")
