"""OpenTelemetry tracing (ATLAS_TRACING): one tracer provider per process, spans exported over OTLP/HTTP.

The spans themselves are Pipecat's: a session's `PipelineWorker` made with `enable_tracing` and
`enable_turn_tracking` (bots/session.py) opens a `conversation` span for the session and a `turn` span per
turn, and Pipecat's service decorators open `stt`, `llm` and `tts` spans under the turn (model, TTFB, text,
tokens). Atlas adds a `tool` span per tool call (bots/tools.py, through `span` below). What this module does is
the process's part: the tracer provider (resource `service.name` = OTEL_SERVICE_NAME), installed as
OpenTelemetry's global one, which Pipecat's `trace.get_tracer(...)` calls use, and its shutdown.

* `start_tracing(settings)`: at start-up (bots/runtime.py `Runtime.load`): with ATLAS_TRACING off, nothing (no
  provider: OpenTelemetry's global one stays the no-op proxy); on, a `BatchSpanProcessor` with an
  `OTLPSpanExporter` to `OTEL_EXPORTER_OTLP_ENDPOINT/v1/traces` (or the exporter's own
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; headers, timeout and compression from the exporter's standard
  OTEL_EXPORTER_OTLP_* variables). Tracing on with no endpoint is refused at start-up (`Settings.check_providers`):
  spans nobody receives would cost for nothing. Health probes and scrapes are never traced (`PROBE_PATHS`).
* `shutdown_tracing()`: at shutdown (`Runtime.close`): the spans still queued are sent, then the provider stops.
* `install_tracing(service_name, *processors)`: the provider itself, made once per process; the processors are
  added to it. Tests pass an in-memory exporter (`SimpleSpanProcessor(InMemorySpanExporter())`) and read the
  finished spans back.

OpenTelemetry lets a process set its global provider once, so a provider shut down stays shut: a process traces
for one run of the server (every worker process of `serve --workers` has its own).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loguru import logger

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span

    from config.settings import Settings

TRACER_NAME = "atlas"  # Atlas's own spans (tools); Pipecat's are under "pipecat" and "pipecat.turn"
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})  # requests never traced (app/server.py)

_lock = threading.Lock()
_provider: TracerProvider | None = None
_shut_down = False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atlas-voice")
    except PackageNotFoundError:
        return "unknown"


def install_tracing(service_name: str, *processors: SpanProcessor) -> TracerProvider:
    """The process's tracer provider, with `processors` added to it.

    Made on the first call (resource: `service.name`, `service.version`, `service.instance.id` = host and
    process id) and set as OpenTelemetry's global provider, which Pipecat's spans use. If another SDK provider is
    already global (an application embedding Atlas set one), that one is used and the processors join it."""
    global _provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    with _lock:
        if _provider is None:
            current = trace.get_tracer_provider()
            if isinstance(current, TracerProvider):
                _provider = current
            else:
                resource = Resource.create(
                    {
                        "service.name": service_name,
                        "service.version": _version(),
                        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
                    }
                )
                _provider = TracerProvider(resource=resource)
                _provider.sampler = _without_probes(_provider.sampler)  # the OTEL_TRACES_SAMPLER one, wrapped
                trace.set_tracer_provider(_provider)
        for processor in processors:
            _provider.add_span_processor(processor)
        return _provider


def _without_probes(delegate):
    """A sampler that drops the spans of probes and scrapes (`PROBE_PATHS`), and leaves the rest to `delegate`.

    FastAPI traces every request once a tracer provider is set: a health probe every few seconds from every
    orchestrator, and each Prometheus scrape, would each be a trace that says nothing. The children of a dropped
    span are dropped with it (the default sampler follows the parent)."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class WithoutProbes(Sampler):
        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, **rest):
            if attributes and attributes.get("url.path") in PROBE_PATHS:
                return SamplingResult(Decision.DROP)
            return delegate.should_sample(parent_context, trace_id, name, kind, attributes, links, **rest)

        def get_description(self) -> str:
            return f"WithoutProbes{{{delegate.get_description()}}}"

    return WithoutProbes()


def traces_url(settings: Settings) -> str:
    """Where the spans are POSTed: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as it is (the spec says it wins), else
    `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`."""
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        settings.otel_exporter_otlp_endpoint.strip().rstrip("/") + "/v1/traces"
    )


def start_tracing(settings: Settings) -> bool:
    """Tracing for this process as the settings say: False (and nothing done) with ATLAS_TRACING off, or once the
    process's provider has been shut down; else True, spans going over OTLP/HTTP in batches."""
    if not settings.tracing:
        return False
    if _shut_down:
        logger.warning("tracing: this process's tracer provider was shut down; no spans from now on")
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    url = traces_url(settings)
    install_tracing(settings.otel_service_name, BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    parts = urlsplit(url)  # logged without credentials or a query (logs carry no secrets)
    shown = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
    logger.info(f"tracing: every session's spans go to {shown} (OTLP/HTTP) as service {settings.otel_service_name!r}")
    return True


def tracing_installed() -> bool:
    return _provider is not None and not _shut_down


def shutdown_tracing(timeout_secs: float = 5.0) -> None:
    """Send the spans still queued (waiting at most `timeout_secs`), then stop the provider. Safe to call when
    tracing never started, and more than once."""
    global _shut_down
    with _lock:
        provider, done = _provider, _shut_down
        _shut_down = True
    if provider is None or done:
        return
    try:
        if not provider.force_flush(int(timeout_secs * 1000)):
            logger.warning(f"tracing: spans still unsent after {timeout_secs:g} s at shutdown were dropped")
        provider.shutdown()
    except Exception as e:  # noqa: BLE001 - the collector's trouble must not stop the server's shutdown
        logger.warning(f"tracing: shutdown failed: {type(e).__name__}: {e}")


@contextmanager
def span(name: str, attributes: dict[str, Any]) -> Iterator[Span | None]:
    """An Atlas span (a child of the current one, e.g. the `llm` span a tool call comes from), made current while
    the block runs; None, and nothing made, when this process does not trace."""
    if not tracing_installed():
        yield None
        return
    from opentelemetry import trace

    with trace.get_tracer(TRACER_NAME).start_as_current_span(name, attributes=attributes) as current:
        yield current


def annotate(current: Span | None, attributes: dict[str, Any], error: str | None = None) -> None:
    """Add attributes to a span from `span` (None: nothing), and an error status with `error` as its description."""
    if current is None:
        return
    current.set_attributes(attributes)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        current.set_status(Status(StatusCode.ERROR, error))
