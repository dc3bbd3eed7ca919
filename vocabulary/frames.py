"""Atlas's own Pipecat frame types, shared by the services that push them and the doors that read them."""

from __future__ import annotations

from dataclasses import dataclass

from pipecat.frames.frames import DataFrame, ErrorFrame
from pipecat.utils.errors import ErrorCategory


@dataclass
class SentenceStartFrame(DataFrame):
    """The audio after this frame belongs to a new reply sentence (processors.sentence_marker puts it
    in front of each sentence's first audio; the /ws serializer numbers the `audio_chunk`s after it)."""


@dataclass
class CodedErrorFrame(ErrorFrame):
    """An ErrorFrame that says which stable client error code it stands for.

    Pipecat's ErrorFrame carries a free-text description meant for logs (it may name hosts or quote a
    vendor's message). The doors turn every ErrorFrame that reaches the pipeline worker into an `error`
    for the client; this subclass lets a service choose the documented code and a client-safe message
    instead of the generic PIPELINE_ERROR."""

    code: str = "PIPELINE_ERROR"
    client_message: str = ""


def coded_error(code: str, client_message: str, detail: str = "") -> CodedErrorFrame:
    """A recoverable provider error: CONNECTIVITY/SERVER categories never mark the service unusable."""
    return CodedErrorFrame(
        error=detail or client_message,
        code=str(code),
        client_message=client_message,
        category=ErrorCategory.SERVER,
    )
