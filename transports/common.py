"""What the doors share: joining the caller's short audio messages, the size check of a text message,
closing a socket that may already be gone."""

from __future__ import annotations

from starlette.websockets import WebSocketState


async def close_quietly(websocket, code: int) -> None:
    """Close a door's socket if the client is still there (it may vanish at any moment)."""
    if websocket.client_state == WebSocketState.CONNECTED:
        try:
            await websocket.close(code)
        except Exception:
            pass


def text_too_large(data: str, max_bytes: int) -> bool:
    """Whether a text frame is over `max_bytes` of UTF-8 (a character takes 1 to 4 bytes)."""
    return len(data) > max_bytes or (
        len(data) * 4 > max_bytes and len(data.encode("utf-8", "surrogatepass")) > max_bytes
    )


class AudioBatcher:
    """Joins the caller's short audio messages into frames of at least `ms` milliseconds.

    Browsers and Twilio send 20 ms of audio per message. Every frame in a Pipecat pipeline costs
    a queue hop and a task wake-up at each processor it visits (the input transport, STT, the user
    aggregator with its VAD and turn strategies); at 100 sessions that per-frame work is what fills
    the core. Pipecat's input transport passes frames on at whatever size they arrive, so the
    serializers batch here. Silero scores 32 ms windows whatever the frame size; a 40 ms frame
    holds the audio back at most 20 ms. Larger messages pass through at once.
    """

    def __init__(self, sample_rate: int, ms: int):
        self._min = max(2, sample_rate * ms // 1000 * 2)
        self._pending = bytearray()

    def add(self, pcm: bytes) -> bytes | None:
        if not self._pending and len(pcm) >= self._min:
            return pcm
        self._pending += pcm
        if len(self._pending) < self._min:
            return None
        out = bytes(self._pending)
        self._pending.clear()
        return out
