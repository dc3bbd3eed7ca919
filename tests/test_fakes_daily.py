"""services/daily/rooms.py through Pipecat's real DailyRESTHelper against FakeDailyAPI (and the fake's own checks):
the session room's properties, the two tokens, errors as DailyAPIError without the key, cleanup; plus that
daily-python's DailyTransport can be built for such a room without joining it."""

from __future__ import annotations

import time

import aiohttp
import jwt
import pytest
from pipecat.transports.daily.utils import DailyRESTHelper

from fakes.daily import FakeDailyAPI
from services.daily.rooms import (
    DailyAPIError,
    create_session_room,
    delete_room,
    make_helper,
)

KEY = "test-daily-key-0123456789abcdef0123456789abcdef"  # >= 32 bytes: pyjwt warns of shorter HS256 keys
DURATION = 600


@pytest.fixture
def fake():
    with FakeDailyAPI(api_key=KEY) as server:
        yield server


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
def helper(fake, http) -> DailyRESTHelper:
    return DailyRESTHelper(daily_api_key=KEY, daily_api_url=fake.api_url, aiohttp_session=http)


async def _session(helper, **kwargs):
    return await create_session_room(helper, max_duration_secs=DURATION, bot_name="Atlas", **kwargs)


# ---- the session room --------------------------------------------------------------------------------------


async def test_room_expires_after_max_duration_and_ejects_everyone(fake, helper):
    before = time.time()
    session = await _session(helper, user_name="Caller")

    assert session.room_url == f"https://atlas-test.daily.co/{session.room_name}"
    assert before + DURATION <= session.expires_at <= time.time() + DURATION + 1
    props = fake.room_properties(session.room_name)
    assert props["exp"] == session.expires_at
    assert props["eject_at_room_exp"] is True
    assert 2 <= props["max_participants"] <= 10
    assert props["enable_prejoin_ui"] is False
    assert fake.room(session.room_name)["privacy"] == "private"

    create = next(r for r in fake.requests if r.method == "POST" and r.path == "/v1/rooms")
    assert create.headers["authorization"] == f"Bearer {KEY}"
    # Pipecat's helper reads the room back the way Daily answers it.
    room = await helper.get_room_from_url(session.room_url)
    assert room.name == session.room_name and room.config.exp == session.expires_at
    assert room.config.eject_at_room_exp is True
    # Tokens are secrets: not in the session's repr.
    assert session.user_token not in repr(session) and session.bot_token not in repr(session)


async def test_user_token_is_not_owner_bot_token_is_owner_both_expire_with_the_room(fake, helper):
    session = await _session(helper, user_name="Caller")

    user = jwt.decode(session.user_token, KEY, algorithms=["HS256"])  # Daily's abbreviated claims
    bot = jwt.decode(session.bot_token, KEY, algorithms=["HS256"])
    assert user["r"] == bot["r"] == session.room_name
    assert user["exp"] == bot["exp"] == session.expires_at
    assert user["o"] is False and bot["o"] is True
    assert user["ejt"] is True and bot["ejt"] is True
    assert user["u"] == "Caller" and bot["u"] == "Atlas"
    assert fake.decode_token(session.bot_token)["is_owner"] is True
    assert fake.decode_token(session.user_token)["room_name"] == session.room_name


async def test_bad_key_is_a_401_daily_api_error_without_the_key(fake, http):
    wrong = "sk-wrong-daily-key-123456"
    helper = make_helper(wrong, http, fake.api_url)
    with pytest.raises(DailyAPIError) as info:
        await _session(helper)
    err = info.value
    assert err.status == 401 and err.error == "authentication-error" and not err.retryable
    assert err.operation == "create room"
    assert wrong not in str(err) and wrong not in repr(err) and wrong not in (err.info or "")
    assert fake.rooms == {}


@pytest.mark.parametrize("status, error", [(429, "rate-limit-error"), (500, "server-error"), (503, "server-error")])
async def test_rate_limit_and_server_errors_are_retryable_daily_api_errors(fake, helper, status, error):
    fake.fail_next(status)
    with pytest.raises(DailyAPIError) as info:
        await _session(helper)
    assert (info.value.status, info.value.error) == (status, error)
    assert info.value.retryable and KEY not in str(info.value)
    assert fake.rooms == {}
    # The fault was used once: the next call goes through.
    assert (await _session(helper)).room_name in fake.rooms


async def test_a_failed_token_deletes_the_room_just_made(fake, helper):
    fake.rate_limit_next(endpoint="meeting-tokens")
    with pytest.raises(DailyAPIError) as info:
        await _session(helper)
    assert info.value.status == 429 and info.value.operation == "create bot token"
    assert fake.rooms == {} and len(fake.deleted_rooms) == 1


async def test_no_answer_is_a_retryable_error_without_status(fake, http):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as short:
        helper = make_helper(KEY, short, fake.api_url)
        fake.stall_next(2.0)
        with pytest.raises(DailyAPIError) as info:
            await _session(helper)
    assert info.value.status is None and info.value.retryable
    assert fake.wait_until(lambda: "client_disconnected" in fake.requests[0].events, timeout=3)


async def test_bad_arguments_are_refused_before_calling_daily(fake, helper):
    with pytest.raises(ValueError):
        await create_session_room(helper, max_duration_secs=0, bot_name="Atlas")
    with pytest.raises(ValueError):
        await create_session_room(helper, max_duration_secs=60, bot_name="Atlas", max_participants=1)
    assert fake.requests == []


# ---- cleanup -----------------------------------------------------------------------------------------------


async def test_delete_then_404_on_a_second_delete(fake, helper):
    session = await _session(helper)
    assert await delete_room(helper, session.room_url) is True
    assert session.room_name not in fake.rooms
    assert await delete_room(helper, session.room_url) is False  # already gone: fine for cleanup
    with pytest.raises(DailyAPIError) as info:
        await delete_room(helper, session.room_url, missing_ok=False)
    assert (info.value.status, info.value.error) == (404, "not-found")
    assert [r.status for r in fake.requests if r.method == "DELETE"] == [200, 404, 404]
    # Why delete_room does its own DELETE: Pipecat's helper says True for a room that was not there.
    assert await helper.delete_room_by_url(session.room_url) is True


async def test_an_expired_room_is_gone_and_its_delete_counts(fake, helper):
    session = await _session(helper)
    fake.advance(DURATION + 1)
    with pytest.raises(Exception, match="Room not found"):
        await helper.get_room_from_url(session.room_url)
    assert await delete_room(helper, session.room_url) is True  # 404 with "deleted": true


async def test_delete_room_errors_are_daily_api_errors(fake, helper):
    session = await _session(helper)
    fake.fail_next(500, endpoint="rooms")
    with pytest.raises(DailyAPIError) as info:
        await delete_room(helper, session.room_url)
    assert info.value.status == 500 and info.value.operation == "delete room"
    with pytest.raises(ValueError):
        await delete_room(helper, "https://atlas-test.daily.co/")


# ---- the fake's own wire checks ----------------------------------------------------------------------------


async def _raw(http, method, url, *, key: str | None = KEY, body=None, data=None):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with http.request(method, url, headers=headers, json=body, data=data) as r:
        return r.status, await r.json()


async def test_fake_validates_like_daily(fake, http):
    rooms = f"{fake.api_url}/rooms"
    status, body = await _raw(http, "POST", rooms, key=None, body={})
    assert (status, body["error"]) == (400, "authorization-header-error") and body["info"]
    assert (await _raw(http, "POST", rooms, key="nope", body={}))[0] == 401
    status, body = await _raw(http, "POST", rooms, data="{not json", body=None)
    assert (status, body["error"]) == (400, "json-parsing-error")
    for bad in (
        {"name": "has space"},
        {"name": "x" * 129},
        {"privacy": "secret"},
        {"properties": {"max_participants": 500}},
        {"properties": {"exp": "soon"}},
        {"properties": {"eject_at_room_exp": "yes"}},
        {"properties": {"not_a_property": 1}},
    ):
        status, body = await _raw(http, "POST", rooms, body=bad)
        assert (status, body["error"]) == (400, "invalid-request-error"), bad

    status, room = await _raw(http, "POST", rooms, body={"name": "atlas-1", "properties": {"exp": 4102444800}})
    assert status == 200
    assert set(room) == {"id", "name", "api_created", "privacy", "url", "created_at", "config"}
    assert room["url"] == "https://atlas-test.daily.co/atlas-1" and room["privacy"] == "public"
    assert room["config"] == {"exp": 4102444800} and room["created_at"].endswith("Z")
    assert (await _raw(http, "POST", rooms, body={"name": "atlas-1"}))[0] == 400  # already exists
    assert (await _raw(http, "GET", f"{rooms}/atlas-1"))[1]["name"] == "atlas-1"
    assert (await _raw(http, "GET", rooms))[1]["total_count"] == 1
    assert await _raw(http, "DELETE", f"{rooms}/atlas-1") == (200, {"deleted": True, "name": "atlas-1"})
    status, body = await _raw(http, "GET", f"{rooms}/atlas-1")
    assert (status, body["error"]) == (404, "not-found")

    tokens = f"{fake.api_url}/meeting-tokens"
    status, body = await _raw(http, "POST", tokens, body={"properties": {"room_name": "any", "is_owner": "no"}})
    assert (status, body["error"]) == (400, "invalid-request-error")
    status, body = await _raw(http, "POST", tokens, body={"properties": {"room_name": "any", "exp": 4102444800}})
    assert status == 200 and fake.decode_token(body["token"])["room_name"] == "any"
    assert (await _raw(http, "GET", f"{fake.http_url}/v1/nothing-here"))[0] == 404


async def test_fake_can_require_the_token_room_to_exist(http):
    with FakeDailyAPI(api_key=KEY, tokens_require_room=True, domain="other") as fake:
        status, body = await _raw(
            http, "POST", f"{fake.api_url}/meeting-tokens", body={"properties": {"room_name": "missing"}}
        )
        assert (status, body["error"]) == (400, "invalid-request-error")
        helper = make_helper(KEY, http, fake.api_url)
        session = await _session(helper)
        assert session.room_url.startswith("https://other.daily.co/")


# ---- daily-python ------------------------------------------------------------------------------------------


async def test_daily_transport_can_be_built_for_a_session_room_without_joining(helper):
    pytest.importorskip("daily")
    from pipecat.transports.daily.transport import DailyParams, DailyTransport

    session = await _session(helper)
    transport = DailyTransport(
        session.room_url, session.bot_token, "Atlas", params=DailyParams(audio_in_enabled=True, audio_out_enabled=True)
    )
    try:
        assert transport.room_url == session.room_url
        assert transport.input() is not None and transport.output() is not None
        assert transport.participant_id == ""  # never joined
    finally:
        await transport._client.cleanup()  # release daily-python's CallClient (nothing public does it unjoined)
