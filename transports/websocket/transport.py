"""Pipecat's FastAPI WebSocket transport, with an output that paces audio by the client's playback clock."""

from __future__ import annotations

import asyncio
import time

from pipecat.frames.frames import Frame, TTSTextFrame
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.websocket.fastapi import FastAPIWebsocketTransport

from compat.pipecat import WebsocketOutputInternals, use_output


class AtlasOutputTransport(WebsocketOutputInternals):
    """Pipecat's WebSocket output with three changes.

    1. Queued non-audio frames reach the serializer. Pipecat's media sender releases frames such
       as TTSTextFrame in order behind the audio queued before them and then calls
       `write_transport_frame`, which the FastAPI transport ignores. We serialize them, so the
       client learns which sentence the audio belongs to when that audio has been sent.
    2. Pacing keeps the client `PLAYBACK_LEAD_SECS` ahead instead of one 40 ms chunk. Pipecat
       sends audio at exactly real time once the first chunk is out, so any network hiccup longer
       than a chunk is an audible gap. A 200 ms lead absorbs ordinary jitter while keeping "sent"
       within 200 ms of "heard", which is what the context keeps on interruption.

    The client's playback clock is the serializer's `client_playing_until`, advanced as each
    chunk is serialized and reset on interruption, so pacing and `audio_flush` read one clock.
    """

    PLAYBACK_LEAD_SECS = 0.2

    async def write_transport_frame(self, frame: Frame):
        await self.write_frame(frame)

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        # 3. Word-timed text (a voice with word timestamps, e.g. ElevenLabs) is released by the media
        #    sender's clock when the word plays and pushed on without reaching the serializer: send
        #    it to the client then, as that word's `bot_transcript`.
        if direction == FrameDirection.DOWNSTREAM and isinstance(frame, TTSTextFrame) and frame.pts:
            await self.write_frame(frame)
        await super().push_frame(frame, direction)

    async def audio_sleep(self) -> None:
        ahead = self.serializer.client_playing_until - time.monotonic() - self.PLAYBACK_LEAD_SECS
        if ahead > 0:
            await asyncio.sleep(ahead)


class AtlasWebsocketTransport(FastAPIWebsocketTransport):
    """FastAPIWebsocketTransport with `AtlasOutputTransport` as its output."""

    def __init__(self, websocket, params, **kwargs):
        super().__init__(websocket, params, **kwargs)
        use_output(self, AtlasOutputTransport)
