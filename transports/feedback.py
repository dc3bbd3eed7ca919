"""`POST /feedback`: a client rates a session it had, with that session's feedback token.

Body (JSON, at most 4096 bytes): `{"sessionId", "feedbackToken", "rating": 1-5, "comment"?: <= 1000 chars}`.
The token comes in the session's `session_end` (bots/tokens.py FeedbackTokens: signed by the server, bound to
the session and its user, valid a day), so a client rates only its own sessions, with or without auth. Answers
200 `{"ok": true}`; 400 `INVALID_JSON` / `INVALID_FIELD`, 401 `AUTH_FAILED`, 413 `FRAME_TOO_LARGE`.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from bots.feedback import parse_feedback, record_feedback
from bots.runtime import Runtime
from transports.common import MAX_START_BODY_BYTES, error_response
from vocabulary.errors import ErrorCode, ProtocolError


async def post_feedback(request: Request, runtime: Runtime) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_START_BODY_BYTES:
        return error_response(
            413, str(ErrorCode.FRAME_TOO_LARGE), f"the request body is limited to {MAX_START_BODY_BYTES} bytes"
        )
    try:
        data = json.loads(body or b"null")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return error_response(400, str(ErrorCode.INVALID_JSON), "the body must be a JSON object")
    session_id = data.get("sessionId")
    try:
        user_id, door = runtime.feedback_tokens.check(data.get("feedbackToken"), session_id)
    except ProtocolError as e:
        runtime.monitor.error(str(e.code))
        return error_response(401, str(e.code), e.message)
    try:
        rating, comment = parse_feedback(data)
    except ProtocolError as e:
        return error_response(400, str(e.code), e.message)
    assert isinstance(session_id, str)  # the token's session
    record_feedback(runtime, session_id, user_id, door, rating, comment)
    return JSONResponse({"ok": True})
