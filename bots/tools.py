"""Tools an agent may call: a name, a JSON schema for the arguments, an async handler.

Register one in any module named by ATLAS_TOOL_MODULES (imported at start-up)::

    from bots.tools import ToolCall, tool

    @tool(
        description="The current local time in a city.",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    async def get_time(args: dict, call: ToolCall) -> str:
        return f"It is 9:41 in {args['city']}."

and list it in an agent's `tools` (config/agents.py). The handler gets the arguments the LLM sent (already
checked against the schema) and a `ToolCall` (the session, the agent, the door); what it returns (a string,
or anything JSON can hold) goes back to the LLM, which then says the answer.

This sits on Pipecat's function calling (`FunctionSchema`, `ToolsSchema`, `register_function`), which turns
the schema into Claude's `tools` and the OpenAI-style `tools` the local llama-server takes, runs the handler
in its own task (the audio path never waits on a tool) and records the call and its result in the context.
What Pipecat leaves to the application, and `pipecat_handler` adds: arguments checked against the schema; a
bounded time per call; and for a tool that raises or runs out of time, a spoken apology, a `TOOL_FAILED`
error to the client and a result that tells the LLM it failed, with no second LLM request (a flaky tool
cannot loop the model).

Built-in tools: `end_call` (hangs up on every door once the goodbye has been heard) and `transfer_call`
(phone door: Twilio dials the agent's `transfer_number`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from loguru import logger

from monitoring import tracing

TOOL_APOLOGY = "Sorry, I couldn't get that done just now."
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_RESULT_CHARS = 4000  # what a tool returns goes into every later request of the call


@dataclass
class ToolCall:
    """What a handler knows about the call it serves, and what it can do to it."""

    session_id: str
    agent: str
    door: str  # websocket, twilio or daily
    user_id: str | None = None
    # Set by the session: end the call once the reply being spoken has been heard; transfer it (phone door).
    end: Callable[[], Awaitable[None]] | None = None
    transfer: Callable[[str], Awaitable[str | None]] | None = None
    transfer_number: str | None = None


ToolHandler = Callable[[dict, ToolCall], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    handler: ToolHandler
    timeout_secs: float | None = None  # None: ATLAS_TOOL_TIMEOUT_SECS
    speaks_after: bool = True  # False: the LLM is not asked again after the result (end_call)
    validator: Any = field(default=None, compare=False, repr=False)


_TOOLS: dict[str, Tool] = {}


def register_tool(
    name: str,
    handler: ToolHandler,
    *,
    description: str,
    parameters: dict | None = None,
    timeout_secs: float | None = None,
    speaks_after: bool = True,
) -> Tool:
    """Make a tool available to agents that list it; ValueError for a bad name, schema or a second tool of
    the same name."""
    if not _NAME.match(name):
        raise ValueError(f"tool name {name!r}: letters, digits, '_' and '-' only, at most 64 (Claude's rule)")
    if name in _TOOLS and _TOOLS[name].handler is not handler:
        raise ValueError(f"a tool named {name!r} is already registered")
    if not description.strip():
        raise ValueError(f"tool {name!r} needs a description (the LLM decides from it when to call the tool)")
    if not asyncio.iscoroutinefunction(handler):
        raise ValueError(f"tool {name!r}: the handler must be an async function (args, call)")
    schema = parameters if parameters is not None else {"type": "object", "properties": {}}
    if schema.get("type") != "object":
        raise ValueError(f'tool {name!r}: parameters must be a JSON schema with "type": "object"')
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"tool {name!r}: parameters is not a valid JSON schema: {e.message}") from None
    tool = Tool(name, description, schema, handler, timeout_secs, speaks_after, jsonschema.Draft202012Validator(schema))
    _TOOLS[name] = tool
    return tool


def tool(
    name: str | None = None,
    *,
    description: str,
    parameters: dict | None = None,
    timeout_secs: float | None = None,
) -> Callable[[ToolHandler], ToolHandler]:
    """Decorator form of `register_tool`; the name defaults to the function's."""

    def decorate(handler: ToolHandler) -> ToolHandler:
        register_tool(
            name or handler.__name__,
            handler,
            description=description,
            parameters=parameters,
            timeout_secs=timeout_secs,
        )
        return handler

    return decorate


def registered_tools() -> dict[str, Tool]:
    return dict(_TOOLS)


def import_tool_modules(modules: list[str]) -> None:
    """Import the modules that register tools (ATLAS_TOOL_MODULES); a module that fails stops the start-up."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:
            raise ValueError(f"ATLAS_TOOL_MODULES: importing {module!r} failed: {type(e).__name__}: {e}") from e


# --- built-in tools ------------------------------------------------------------------------------


async def _end_call(args: dict, call: ToolCall) -> str:
    if call.end is None:
        return "this call cannot be ended from here"
    await call.end()
    return "the call ends once your goodbye has been heard"


async def _transfer_call(args: dict, call: ToolCall) -> str:
    if call.transfer is None or call.transfer_number is None:
        return "transfers are only possible on phone calls; tell the caller you cannot transfer them"
    error = await call.transfer(call.transfer_number)
    if error:
        raise RuntimeError(error)
    return "the caller is being transferred now"


register_tool(
    "end_call",
    _end_call,
    description=(
        "Hang up. Call it only when the caller has said goodbye or asked to end the call; say your own short "
        "goodbye in the same reply, before calling it."
    ),
    speaks_after=False,
)
register_tool(
    "transfer_call",
    _transfer_call,
    description=(
        "Transfer the caller to a person at the front desk. Use it when the caller asks for a human or for "
        "something you cannot do. Tell them you are transferring them in the same reply, before calling it."
    ),
    speaks_after=False,
)


# --- Pipecat glue ------------------------------------------------------------------------------------


def tools_schema(tools: list[Tool]):
    """Pipecat's `ToolsSchema` for these tools (its adapters make Claude's and OpenAI's shapes of it)."""
    from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
    from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema

    return ToolsSchema(
        standard_tools=[
            FunctionSchema(
                name=t.name,
                description=t.description,
                properties=t.parameters.get("properties", {}),
                required=list(t.parameters.get("required", [])),
            )
            for t in tools
        ]
    )


def _result_text(result: Any) -> str | Any:
    if isinstance(result, str):
        return result[:MAX_RESULT_CHARS]
    try:
        text = json.dumps(result, default=str)
    except (TypeError, ValueError):
        text = str(result)
    return result if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS]


def pipecat_handler(
    tool: Tool,
    call: ToolCall,
    timeout_secs: float,
    on_failure: Callable[[str, str], Awaitable[None]],
):
    """The handler Pipecat's `register_function` runs for `tool` in one session.

    `on_failure(tool_name, reason)` is awaited when the tool raised or ran out of time, before the result: the
    session tells the client (TOOL_FAILED) and speaks the apology.
    """
    from pipecat.frames.frames import FunctionCallResultProperties

    limit = tool.timeout_secs or timeout_secs

    async def handle(params) -> None:
        # With ATLAS_TRACING, a `tool` span per call, under the `llm` span whose reply asked for it.
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool.name,
            "gen_ai.tool.call.id": str(getattr(params, "tool_call_id", "") or ""),
            "session.id": call.session_id,
        }
        with tracing.span("tool", attributes) as traced:
            try:
                outcome = await run(params)
            except asyncio.CancelledError:  # an interruption: no failure of the tool's
                tracing.annotate(traced, {"atlas.tool.outcome": "cancelled"})
                raise
            failed = outcome in ("timeout", "failed")  # arguments the model got wrong are no failure of the tool's
            tracing.annotate(traced, {"atlas.tool.outcome": outcome}, error=outcome if failed else None)

    async def run(params) -> str:
        """Run the call; its outcome: ok, invalid_arguments, timeout or failed."""
        args = dict(params.arguments or {})
        errors = sorted(tool.validator.iter_errors(args), key=lambda e: list(e.path))
        if errors:
            # The model asked wrongly: tell it what was wrong, and let it try again or answer.
            problem = errors[0].message[:200]
            logger.info(f"tool {tool.name}: arguments refused ({problem})")
            await params.result_callback({"error": f"invalid arguments: {problem}"})
            return "invalid_arguments"
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(tool.handler(args, call), limit)
        except TimeoutError:
            outcome, reason = "timeout", f"no answer within {limit:g} s"
        except asyncio.CancelledError:
            raise  # an interruption: Pipecat settles the call
        except Exception as e:  # noqa: BLE001 - whatever a tool raises, the call goes on
            outcome, reason = "failed", f"{type(e).__name__}: {e}"[:300]
            logger.opt(exception=e).warning(f"tool {tool.name} raised")
        else:
            logger.info(f"tool {tool.name} answered in {(time.monotonic() - started) * 1000:.0f} ms")
            properties = None if tool.speaks_after else FunctionCallResultProperties(run_llm=False)
            await params.result_callback(_result_text(result), properties=properties)
            return "ok"
        logger.warning(f"session {call.session_id}: tool {tool.name} failed: {reason}")
        await on_failure(tool.name, reason)
        await params.result_callback(
            {"error": f"the tool failed ({reason}); the caller was told it could not be done"},
            properties=FunctionCallResultProperties(run_llm=False),
        )
        return outcome

    return handle
