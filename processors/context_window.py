"""Keep the LLM's conversation to the last N messages of history, plus the turn being answered.

Pipecat has no "last N messages" cap (its context grows without bound, one of the complaints
about long calls), so this processor sits between the user aggregator and the LLM and trims the
shared `LLMContext` in place each time it is sent for inference. Trimming in place (not a copy)
keeps memory and request size flat for the whole call. The system prompt lives in the LLM
service's settings, never in the message list, so it is never trimmed.

As the spec builds a request: the last N messages of history, then the new question. The turn being
answered (the last user message, and any tool calls and results that followed it) is never cut; of
the history before it, the last N are kept, and where that slice would open on a reply (after an
interruption or a tool call) the cut moves on to the next user message: Claude's Messages API expects
the user to speak first, a window opening on a reply to a question it no longer shows confuses any
model, and a tool result is never separated from its call. In a plain alternating call, N = 10 keeps
five whole exchanges and the question: 11 messages.

A preemptive reply (processors/turn_end.py) is asked for with a provisional copy of the context (the
shared one plus the words so far), and a turn it answers writes to the shared context without another
request passing here; so the shared context (`context`) is trimmed too whenever a copy passes, or it
would grow for as long as preemptive replies keep being kept.
"""

from __future__ import annotations

from pipecat.frames.frames import Frame, LLMContextFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


def trim_messages(messages: list, keep: int) -> list:
    """The turn being answered, after at most `keep` messages of history that open on a user message."""
    if keep <= 0 or len(messages) <= keep + 1:
        return list(messages)
    users = [i for i, m in enumerate(messages) if _role(m) == "user"]
    current = users[-1] if users else len(messages)  # where the turn being answered begins
    if current <= keep:
        return list(messages)
    start = current - keep
    while start < current and _role(messages[start]) != "user":
        start += 1
    return list(messages[start:])


class ContextWindow(FrameProcessor):
    def __init__(self, max_messages: int = 10, context=None, **kwargs):
        super().__init__(**kwargs)
        self.max_messages = max_messages
        self.context = context  # the session's shared LLMContext

    def _trim(self, context) -> None:
        messages = context.get_messages()
        kept = trim_messages(messages, self.max_messages)
        if len(kept) != len(messages):
            context.set_messages(kept)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            self._trim(frame.context)
            if self.context is not None and frame.context is not self.context:
                self._trim(self.context)
        await self.push_frame(frame, direction)
