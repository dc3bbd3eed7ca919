"""Start tickets: what `POST /start` hands a Pipecat client, and the WebRTC offer or the RTVI socket redeems."""

from __future__ import annotations

from bots.tokens import SignedTokens
from vocabulary.errors import ErrorCode, ProtocolError

KINDS = ("webrtc", "websocket")
AGAIN = "POST /start again"


class StartTickets:
    """Signed, short-lived, single-use tickets for one session of one door (`webrtc` or `websocket`).

    A token of bots/tokens.py with the caller's verified user id (`sub`, empty without auth), the agent, the
    voice speed, the door (`kind`), and an `exp` ATLAS_SESSION_START_TIMEOUT_SECS away. A ticket is redeemed in
    whichever process the client's next request reaches (they share ATLAS_SESSION_TOKEN_SECRET). A redeemed
    ticket is remembered until it expires: it starts one session per process (the per-user and per-IP limits,
    shared through Redis when configured, bound what a copied ticket could do in another).
    """

    def __init__(self, secret_key: str, ttl_secs: float):
        self._tokens = SignedTokens(secret_key, "atlas:start", ttl_secs)

    def issue(self, kind: str, user_id: str | None, agent: str | None, speed: float = 1.0) -> str:
        assert kind in KINDS
        return self._tokens.issue({"kind": kind, "sub": user_id or "", "agent": agent or "", "speed": speed})

    def check(self, ticket, kind: str) -> dict:
        """The ticket's claims if it is signed by this server, unexpired and for `kind`; else ProtocolError
        (AUTH_FAILED, with a message safe to show)."""
        if ticket is None or ticket == "":
            raise ProtocolError(ErrorCode.AUTH_FAILED, "no start ticket: POST /start first")
        claims = self._tokens.check(ticket, "start ticket", AGAIN)
        if claims.get("kind") != kind:
            raise ProtocolError(ErrorCode.AUTH_FAILED, f"the start ticket is not for the {kind} door")
        return claims

    def redeem(self, ticket, kind: str) -> dict:
        """`check`, and the ticket may not be redeemed again (in this process)."""
        claims = self.check(ticket, kind)
        self._tokens.spend(claims, "start ticket", AGAIN)
        return claims
