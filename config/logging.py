"""One logging set-up for every entry point (the server, the CLI), through loguru.

`diagnose=False` everywhere: loguru's default handler prints the values of local variables in
tracebacks, which may hold API keys, access tokens or a caller's phone number.

`ATLAS_LOG_FORMAT=json` writes one JSON object a line (`time`, `level`, `message`, `logger`, `function`,
`line`, and `session_id` on every line logged on a session's behalf, Pipecat's included: a session runs
inside `logger.contextualize(session_id=...)`, and the tasks it starts inherit that context), for a log
pipeline to index; `text` (the default) is loguru's readable line.
"""

from __future__ import annotations

import json
import sys

from loguru import logger


def _json_line(message) -> None:
    record = message.record
    line = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
        "function": record["function"],
        "line": record["line"],
    }
    line.update({k: v for k, v in record["extra"].items() if isinstance(v, str | int | float | bool)})
    if record["exception"] is not None:
        exc = record["exception"]
        line["exception"] = f"{exc.type.__name__ if exc.type else 'Exception'}: {exc.value}"
    sys.stderr.write(json.dumps(line, default=str) + "\n")


def configure_logging(level: str, fmt: str = "text") -> None:
    logger.remove()
    if fmt == "json":
        logger.add(_json_line, level=level.upper(), diagnose=False, backtrace=False, catch=True)
    else:
        logger.add(sys.stderr, level=level.upper(), diagnose=False, backtrace=False)
