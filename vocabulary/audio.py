"""Audio constants every door and the pipeline share."""

from __future__ import annotations

import time

from pipecat.frames.frames import InputAudioRawFrame

CLIENT_SAMPLE_RATE = 16000  # the caller's audio in the pipeline, every door
PHONE_RATE = 8000  # Twilio Media Streams: 8 kHz mu-law both ways

# Frame.metadata key: when the caller's audio in this frame reached the server (time.monotonic()); the
# pipeline measures how far behind the caller it runs from it (ATLAS_MAX_AUDIO_LAG_SECS).
RECEIVED_AT = "atlas_received_at"


def stamped(frame: InputAudioRawFrame) -> InputAudioRawFrame:
    """Mark a caller audio frame with when it arrived (see RECEIVED_AT)."""
    frame.metadata[RECEIVED_AT] = time.monotonic()
    return frame


# A session's voice speed (`speed` in session_start): ElevenLabs' documented range; Piper and PlayHT take the same.
MIN_VOICE_SPEED, MAX_VOICE_SPEED = 0.7, 1.2
