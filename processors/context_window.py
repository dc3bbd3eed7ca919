"""Keep the LLM's conversation to the last N messages.

Pipecat has no "last N messages" cap (its context grows without bound, one of the complaints
about long calls), so this processor sits between the user aggregator and the LLM and trims the
shared `LLMContext` in place each time it is sent for inference. Trimming in place (not a copy)
keeps memory and request size flat for the whole call. The system prompt lives in the LLM
service's settings, never in the message list, so it is never trimmed. A cut never separates a
tool result from the call that produced it, and the kept window always opens with a user message
(as the spec's "last 10 messages" does): Claude's Messages API expects the user to speak first,
and a window opening on a reply to a question it no longer shows confuses any model. So a window
of 10 holds 9 messages when the 10th-newest is the bot's: four exchanges and the new question.

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


def _is_tool_result(message) -> bool:
    return _role(message) == "tool"


def trim_messages(messages: list, keep: int) -> list:
    """The last `keep` messages, moving the cut earlier rather than orphan a tool result."""
    if keep <= 0 or len(messages) <= keep:
        return list(messages)
    start = len(messages) - keep
    while start > 0 and _is_tool_result(messages[start]):
        start -= 1
    while start < len(messages) - 1 and _role(messages[start]) != "user":
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
