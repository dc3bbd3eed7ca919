"""An ErrorFrame that says which stable client error code it stands for.

Pipecat's ErrorFrame carries a free-text description meant for logs (it may name hosts or quote a
vendor's message). The WebSocket door turns every ErrorFrame that reaches the pipeline worker into
an `error` message for the client; this subclass lets a service choose the documented code and a
client-safe message instead of the generic PIPELINE_ERROR.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipecat.frames.frames import ErrorFrame
from pipecat.utils.errors import ErrorCategory


@dataclass
class CodedErrorFrame(ErrorFrame):
    code: str = "PIPELINE_ERROR"
    client_message: str = ""


def coded_error(code: str, client_message: str, detail: str = "") -> CodedErrorFrame:
    """A recoverable provider error: CONNECTIVITY/SERVER categories never mark the service unusable."""
    return CodedErrorFrame(
        error=detail or client_message, code=str(code), client_message=client_message,
        category=ErrorCategory.SERVER,
    )
