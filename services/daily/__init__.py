"""Daily (daily.co) for Atlas: rooms and meeting tokens through Daily's REST API (`rooms`)."""

from services.daily.rooms import (
    DEFAULT_API_URL,
    DailyAPIError,
    DailyRoomSession,
    create_session_room,
    delete_room,
    make_helper,
)

__all__ = [
    "DEFAULT_API_URL",
    "DailyAPIError",
    "DailyRoomSession",
    "create_session_room",
    "delete_room",
    "make_helper",
]
