"""Tools for the agent tests, registered the documented way (ATLAS_TOOL_MODULES=tests.agent_tools)."""

from __future__ import annotations

import asyncio

from bots.tools import ToolCall, tool

CITY_TIMES = {"paris": "9:41 PM", "tokyo": "5:41 AM", "new york": "3:41 PM"}


@tool(
    description="The current local time in a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
        "required": ["city"],
    },
)
async def get_time(args: dict, call: ToolCall) -> str:
    time = CITY_TIMES.get(args["city"].strip().lower())
    if time is None:
        return f"I don't know the time in {args['city']}."
    return f"It is {time} in {args['city']}."


@tool(description="Look up a booking by its reference.", parameters={"type": "object", "properties": {}})
async def broken_lookup(args: dict, call: ToolCall) -> str:
    raise RuntimeError("the booking system is down")


@tool(description="A search that never answers in time.", timeout_secs=1.5)
async def slow_search(args: dict, call: ToolCall) -> str:
    await asyncio.sleep(30)
    return "never"
