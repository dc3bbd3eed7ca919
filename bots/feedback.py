"""How the call went: a session's rating (1-5) and optional comment, from its user.

The page asks at the session's end and posts it with the session's feedback token (`POST /feedback`,
transports/feedback.py); a client may also send a `feedback` message while the session is live. Both land
here: checked, written to `voice_feedback` through the outbox (a later rating of a session replaces the
earlier one), and counted in /metrics (`atlas_feedback_total`, the `satisfaction` alert).
"""

from __future__ import annotations

import re

from bots.runtime import Runtime
from storage.records import FEEDBACK, UPSERT, feedback_row
from vocabulary.errors import ErrorCode, ProtocolError

MAX_COMMENT_CHARS = 1000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters, but newlines and tabs


def parse_feedback(data: dict) -> tuple[int, str | None]:
    """The rating (an integer 1-5) and the comment (a string of at most 1000 characters, control characters
    removed; empty -> None) of a feedback body or message; ProtocolError INVALID_FIELD otherwise."""
    rating = data.get("rating")
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "'rating' must be a whole number from 1 to 5")
    comment = data.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "'comment' must be a string")
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"'comment' is limited to {MAX_COMMENT_CHARS} characters")
    comment = _CONTROL.sub("", comment).strip() if comment else None
    return rating, comment or None


def record_feedback(
    runtime: Runtime, session_id: str, user_id: str | None, transport: str, rating: int, comment: str | None
) -> None:
    """Write the rating (over any earlier one of the session); /metrics counts a session's first rating in this
    process only, so re-posting cannot tip the satisfaction rate."""
    runtime.recorder.submit(FEEDBACK, UPSERT, [feedback_row(session_id, user_id, rating, comment)])
    if runtime.first_rating(session_id):
        runtime.monitor.feedback_recorded(transport, rating)
