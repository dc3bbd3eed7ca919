"""Supabase access tokens in session_start: verified (signature, expiry, audience) when a secret is set."""

from __future__ import annotations

import json
import time
import uuid

import jwt
import pytest
import websockets

from tests.helpers import running_server

SECRET = "test-jwt-secret-with-at-least-32-characters!"


def token(secret: str = SECRET, exp_in: float = 3600, aud: str = "authenticated", **claims) -> str:
    now = int(time.time())
    payload = {"sub": str(uuid.uuid4()), "role": "authenticated", "aud": aud, "iat": now, "exp": now + exp_in, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def auth_ws(llm_record, artifacts):
    env = {"SUPABASE_JWT_SECRET": SECRET, "ATLAS_LLM_URL": llm_record.with_suffix(".url").read_text()}
    with running_server(env, artifacts / "server_auth.log") as base:
        yield base.replace("http://", "ws://") + "/ws"


async def start(url: str, auth_token) -> tuple[dict, int | None]:
    async with websockets.connect(url) as ws:
        await ws.send(
            json.dumps(
                {"type": "session_start", "userId": "claimed-user", "conversationId": "c1", "authToken": auth_token}
            )
        )
        first = json.loads(await ws.recv())
        if first["type"] == "session_started":
            await ws.send(json.dumps({"type": "session_stop"}))
            return first, None
        try:
            await ws.recv()
        except websockets.ConnectionClosed as closed:
            return first, closed.rcvd.code if closed.rcvd else None
        return first, None


async def test_a_valid_token_starts_a_session(auth_ws, artifacts):
    sub = str(uuid.uuid4())
    first, _ = await start(auth_ws, token(sub=sub))
    assert first["type"] == "session_started"
    # The session belongs to the token's user, not to the userId the client claimed.
    log = (artifacts / "server_auth.log").read_text()
    assert f"(user {sub}, agent atlas)" in log
    assert SECRET not in log and "eyJ" not in log  # neither the secret nor any token is logged


@pytest.mark.parametrize(
    "bad,reason",
    [
        (None, "required"),
        ("", "required"),
        ("not-a-jwt", "invalid"),
        (token(secret="another-secret-that-is-also-32-chars-long"), "invalid"),
        (token(exp_in=-120), "expired"),
        (token(aud="somebody-else"), "audience"),
        (token(sub=None), "'sub'"),
    ],
)
async def test_a_bad_token_gets_auth_failed_and_the_socket_closes(auth_ws, bad, reason):
    first, code = await start(auth_ws, bad)
    assert first["type"] == "error" and first["code"] == "AUTH_FAILED", first
    assert reason in first["message"]
    assert code == 1008
    assert SECRET not in json.dumps(first)


async def test_the_rtvi_doors_need_the_token_and_the_session_is_the_tokens_user(auth_ws, artifacts):
    """`POST /start` (Pipecat's clients) checks the Bearer token as every door does; the ticket it answers
    carries the verified user to the session, and a ticket cannot be forged."""
    import httpx
    from pipecat.frames.frames import OutputTransportMessageUrgentFrame
    from pipecat.serializers.protobuf import ProtobufFrameSerializer

    base = auth_ws.replace("ws://", "http://").removesuffix("/ws")
    async with httpx.AsyncClient(timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": f"Bearer {token(exp_in=-120)}"}):
            refused = await http.post(base + "/start", json={"transport": "websocket"}, headers=headers)
            assert refused.status_code == 401 and refused.json()["code"] == "AUTH_FAILED", refused.text
        sub = str(uuid.uuid4())
        started = await http.post(
            base + "/start", json={"transport": "websocket"}, headers={"Authorization": f"Bearer {token(sub=sub)}"}
        )
        assert started.status_code == 200, started.text
        answer = started.json()
        # A ticket of our own making (another key) is refused at the socket.
        forged = jwt.encode({"aud": "atlas:start", "kind": "websocket", "sub": sub, "jti": "x", "exp": 2**31}, "k")
    async with websockets.connect(f"{answer['wsUrl']}?token={forged}") as ws:
        refusal = await ProtobufFrameSerializer().deserialize(await ws.recv())
        assert refusal.message["type"] == "error" and refusal.message["data"]["error"].startswith("AUTH_FAILED")
    ready = {"label": "rtvi-ai", "type": "client-ready", "id": "1", "data": {"version": "2.2.0"}}
    async with websockets.connect(f"{answer['wsUrl']}?token={answer['token']}") as ws:
        await ws.send(await ProtobufFrameSerializer().serialize(OutputTransportMessageUrgentFrame(message=ready)))
        for _ in range(50):
            frame = await ProtobufFrameSerializer().deserialize(await ws.recv())
            if getattr(frame, "message", {}).get("type") == "bot-ready":
                break
        else:
            raise AssertionError("no bot-ready")
    log = (artifacts / "server_auth.log").read_text()
    assert "rtvi_ws session" in log and f"(user {sub}, agent atlas)" in log
    assert "eyJ" not in log  # no token or ticket is logged
