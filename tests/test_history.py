"""A signed-in user's past sessions: GET /api/history and /api/history/<id> with their token, the page at /history,
and Supabase's RLS deciding what a user reads."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import jwt
import pytest

from tests.helpers import running_server

SECRET = "history-test-jwt-secret-with-at-least-32-chars"
AGENT_FILE = """
[agents.atlas]
prompt = "You're Atlas, a warm voice companion. Answer in one short sentence."
store_transcripts = true
"""


def token(sub: str, secret: str = SECRET) -> str:
    now = int(time.time())
    claims = {"sub": sub, "role": "authenticated", "aud": "authenticated", "iat": now, "exp": now + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def history_server(llm_record, artifacts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("history")
    (folder / "agents.toml").write_text(AGENT_FILE)
    env = {
        "SUPABASE_JWT_SECRET": SECRET,
        "ATLAS_AGENT_CONFIG": str(folder / "agents.toml"),
        "ATLAS_LLM_URL": llm_record.with_suffix(".url").read_text(),
        "ATLAS_LLM_MODEL_NAME": "local",
        "ATLAS_LLM_TEMPERATURE": "0",
    }
    with running_server(env, artifacts / "server_history.log") as base:
        yield base


async def _call(base: str, auth: str, wav=None):
    from app.talk import VoiceClient

    client = VoiceClient(base.replace("http://", "ws://") + "/ws", auth_token=auth)
    await client.connect()
    await client.send_silence(0.3)
    if wav is not None:
        await client.say(wav)
        await client.wait_reply_done(timeout=90)
    await client.stop()
    return client


async def test_each_user_lists_only_their_own_calls_with_what_was_said(history_server, speech, artifacts):
    base = history_server
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    call = await _call(base, token(alice), speech["dinner"])
    await _call(base, token(bob))
    end = call.session_end
    assert end is not None
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        rated = await http.post(
            "/feedback", json={"sessionId": call.session_id, "feedbackToken": end["feedbackToken"], "rating": 5}
        )
        assert rated.status_code == 200
        mine: list = []
        for _ in range(50):  # the rows go through the outbox
            r = await http.get("/api/history", headers={"Authorization": f"Bearer {token(alice)}"})
            assert r.status_code == 200, r.text
            mine = r.json()["sessions"]
            if mine and mine[0]["rating"] == 5 and mine[0]["endedAt"]:
                break
            await asyncio.sleep(0.2)
        assert [s["sessionId"] for s in mine] == [call.session_id]
        first = mine[0]
        assert first["turns"] >= 1 and first["durationSeconds"] > 1 and first["rating"] == 5
        assert first["agent"] == "atlas" and first["transport"] == "websocket"
        assert first["costUsd"] == 0.0  # the local engines cost nothing
        detail = await http.get(f"/api/history/{call.session_id}", headers={"Authorization": f"Bearer {token(alice)}"})
        assert detail.status_code == 200
        turns = detail.json()
        assert turns["transcriptStored"] and "dinner" in turns["turns"][0]["user"].lower()
        assert turns["turns"][0]["bot"] and turns["turns"][0]["voiceToVoiceMs"] > 0
        # Bob sees his own call only, and not Alice's, even by its id.
        theirs = (await http.get("/api/history", headers={"Authorization": f"Bearer {token(bob)}"})).json()
        assert call.session_id not in {s["sessionId"] for s in theirs["sessions"]} and len(theirs["sessions"]) == 1
        peek = await http.get(f"/api/history/{call.session_id}", headers={"Authorization": f"Bearer {token(bob)}"})
        assert peek.status_code == 404 and peek.json()["code"] == "NOT_FOUND"
        for headers in (
            {},
            {"Authorization": "Bearer not-a-jwt"},
            {"Authorization": f"Bearer {token(alice, 'x' * 40)}"},
        ):
            refused = await http.get("/api/history", headers=headers)
            assert refused.status_code == 401 and refused.json()["code"] == "AUTH_FAILED"

    # The page: the user's token (as the talk page keeps it), the list, what was said on demand.
    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    def page_check():
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            page.goto(base + "/history")
            page.wait_for_function("window.atlasHistory.state === 'signed-out'")
            page.fill("#token", token(alice))
            page.click("button[type=submit]")
            page.wait_for_function("window.atlasHistory.state === 'ready'")
            assert not page.is_visible("#signin")  # signed in: the form is gone
            row = page.locator(f'li[data-session="{call.session_id}"]')
            text = row.inner_text()
            row.get_by_role("button", name="Show what was said").click()
            row.locator("ol.turns li.you").first.wait_for()
            said = row.locator("ol.turns").inner_text()
            overflow = page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
            page.screenshot(path=str(artifacts / "history_phone.png"), full_page=True)
            browser.close()
            return text, said, overflow

    text, said, overflow = await asyncio.to_thread(page_check)
    assert "5/5" in text and "turns" in text.lower()
    assert "dinner" in said.lower() and not overflow


async def test_history_needs_signed_in_users(atlas):
    async with httpx.AsyncClient(base_url=atlas, timeout=10) as http:
        r = await http.get("/api/history", headers={"Authorization": f"Bearer {token(str(uuid.uuid4()))}"})
    assert r.status_code == 404 and r.json()["code"] == "HISTORY_DISABLED"


@pytest.mark.slow
async def test_on_supabase_a_user_reads_history_as_themselves_and_rls_decides():
    """With SUPABASE_ANON_KEY the sink reads as the user: even asked for another user's id, RLS returns nothing."""
    from fakes.supabase_local.stack import Stack
    from storage.supabase import SupabaseSink

    stack = Stack().start()
    try:
        service = SupabaseSink(stack.api.url, stack.api.service_key)
        sessions = {}
        for user in (stack.user_a, stack.user_b):
            sid = str(uuid.uuid4())
            sessions[user] = sid
            await service.write("voice_sessions", "insert", [{"id": sid, "user_id": str(user), "transport": "webrtc"}])
        await service.write(
            "voice_feedback", "upsert", [{"id": sessions[stack.user_a], "user_id": str(stack.user_a), "rating": 4}]
        )
        await service.write(
            "voice_turns",
            "insert",
            [
                {
                    "id": str(uuid.uuid4()),
                    "session_id": sessions[stack.user_a],
                    "user_id": str(stack.user_a),
                    "turn_index": 0,
                }
            ],
        )
        reader = SupabaseSink(stack.api.url, stack.api.service_key, anon_key=stack.api.anon_key)
        a_token, b_token = stack.api.user_token(stack.user_a), stack.api.user_token(stack.user_b)
        mine = await reader.fetch_history(str(stack.user_a), 10, user_token=a_token)
        assert [(r["id"], r["rating"], r["transport"]) for r in mine] == [(sessions[stack.user_a], 4, "webrtc")]
        # B's token asking for A's rows: RLS answers nothing, whatever the filter says.
        assert await reader.fetch_history(str(stack.user_a), 10, user_token=b_token) == []
        assert await reader.fetch_history_turns(str(stack.user_a), sessions[stack.user_a], user_token=b_token) == []
        turns = await reader.fetch_history_turns(str(stack.user_a), sessions[stack.user_a], user_token=a_token)
        assert [t["turn_index"] for t in turns] == [0]
        # Without the anon key the service role reads, filtered by the verified user.
        assert [r["id"] for r in await service.fetch_history(str(stack.user_b), 10)] == [sessions[stack.user_b]]
        await service.close()
        await reader.close()
    finally:
        stack.stop()
