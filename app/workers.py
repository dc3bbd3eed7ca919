"""`atlas-voice serve --workers N`: N worker processes serving one port, each a whole Atlas server.

One Atlas process is one event loop on one core; the workers use every core. The supervision is
uvicorn's own (`uvicorn.supervisors.Multiprocess`): the parent binds the port once and passes the
listening socket to each worker (the kernel hands each new connection to one of them), pings each
worker over a pipe and replaces one that dies or hangs. Atlas adds what a voice server needs:

* each worker has an index (`ATLAS_WORKER_INDEX`) that names its own outbox file, and the worker
  started in place of a dead one keeps that index, so it drains the rows the dead one left;
* one local LLM server (llama.cpp) for the machine, started by the parent and shared by every
  worker through `ATLAS_LLM_URL` (the model is loaded once, not once per worker);
* `PROMETHEUS_MULTIPROC_DIR`: prometheus_client's multiprocess mode, so /metrics shows the machine's
  totals whichever worker answers (monitoring/metrics.py), and a dead worker's live gauges are
  dropped;
* the drain: SIGTERM is passed to every worker, each drains its own calls (app/server.py
  AtlasServer), and a second SIGTERM is passed on too (end the calls now).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from loguru import logger
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from config.agents import Agents
from config.settings import Settings, secret


class _Worker(Process):
    """uvicorn's worker process, running Atlas's server (app/server.py `make_server`) as worker `index`."""

    def __init__(self, config: uvicorn.Config, sockets, index: int):
        self.index = index
        super().__init__(config, sockets)

    @property
    def server(self):  # built in the worker process, from the environment the parent set up
        if self._server is None:
            from app.server import make_server
            from config.settings import get_settings

            os.environ["ATLAS_WORKER_INDEX"] = str(self.index)
            get_settings.cache_clear()
            self._server = make_server(get_settings(), self.config.host, self.config.port)
        return self._server

    def target(self, sockets=None) -> None:
        self.server  # noqa: B018  built before uvicorn's health-check thread asks it whether it started
        super().target(sockets)


def _forget(pid: int | None) -> None:
    """Drop a dead worker's live gauges from the machine's metrics (prometheus_client multiprocess mode)."""
    if pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class _Supervisor(Multiprocess):
    """uvicorn's supervisor with indexed workers and a two-step drain."""

    def _spawn(self, index: int) -> None:
        worker = _Worker(self.config, self.sockets, index)
        worker.start()
        if index < len(self.processes):
            self.processes[index] = worker
        else:
            self.processes.append(worker)

    def init_processes(self) -> None:
        for index in range(self.processes_num):
            self._spawn(index)

    def keep_subprocess_alive(self) -> None:
        # uvicorn's, except that the replacement keeps the dead worker's index (and so its outbox).
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or already gone
            process.join()
            _forget(process.pid)
            if process.exitcode == STARTUP_FAILURE:
                logger.error(f"worker {index} failed to start; stopping")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.warning(f"worker {index} (pid {process.pid}) died (exit code {process.exitcode}); restarting it")
            self._spawn(index)

    def restart_all(self) -> None:
        """SIGHUP: replace each worker in turn (its replacement drains the same outbox)."""
        for index, old in enumerate(list(self.processes)):
            if self.should_exit.is_set():
                return
            old.terminate()
            old.join()
            _forget(old.pid)
            self._spawn(index)

    def run(self) -> None:
        logger.info(f"supervisor {os.getpid()}: starting {self.processes_num} workers")
        self.init_processes()
        while not self.should_exit.wait(0.5):
            self.handle_signals()
            self.keep_subprocess_alive()
        self.signal_queue.clear()
        self.terminate_all()  # SIGTERM: each worker drains its calls
        while any(p.process.is_alive() for p in self.processes):
            if self.signal_queue:  # a second SIGTERM or Ctrl-C: the workers end their calls now
                self.signal_queue.clear()
                for p in self.processes:
                    if p.process.is_alive() and p.pid is not None:
                        os.kill(p.pid, signal.SIGTERM)
            time.sleep(0.2)
        for p in self.processes:
            p.process.join()
            _forget(p.pid)
        logger.info(f"supervisor {os.getpid()}: every worker has stopped")


class _SharedLLM:
    """The machine's one local LLM server, run on an event loop of its own in the supervisor."""

    def __init__(self, settings: Settings, workers: int):
        from services.local.llama_server import LlamaServer
        from services.local.models import resolve_llm_path

        path = resolve_llm_path(settings.llm_model_path, settings.cache_dir, False)
        # the workers' sessions share it: slots for each worker's share (the server picks a session's slot by
        # its prompt, as the workers do not pin them)
        self.server = LlamaServer(
            path,
            threads=settings.llm_threads,
            context_tokens=settings.llm_context_tokens,
            slots=settings.llm_slots * workers,
            cache_reuse_tokens=settings.llm_cache_reuse_tokens,
            binary=settings.llama_server,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="atlas-llm", daemon=True)

    def start(self, prompt: str) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()
        # the workers' sessions start warm: the server picks the slot whose cache shares their prompt's start
        asyncio.run_coroutine_threadsafe(self.server.warm_slots(prompt), self.loop).result()
        return self.server.base_url

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def needs_shared_llm(settings: Settings, agents: Agents) -> bool:
    """The agents need this machine's own local LLM (not Claude alone, not a server at ATLAS_LLM_URL)."""
    from bots.agents import engine_needs

    needs = engine_needs(settings, agents)
    return needs.local_llm and not settings.llm_url and not needs.openai


def serve_workers(settings: Settings, host: str, port: int, workers: int, agents: Agents) -> None:
    """Serve `host:port` with `workers` Atlas processes for `agents` (checked by `serve`) until SIGTERM (drain) or
    Ctrl-C."""
    settings.check_exposure(host)
    own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="atlas-metrics-"))
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # a previous run's numbers are not this run's
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ["ATLAS_WORKERS"] = str(workers)  # each worker's /readyz waits for all of them
    if not secret(settings.session_token_secret):  # a token Atlas hands out is redeemed in whichever worker
        os.environ["ATLAS_SESSION_TOKEN_SECRET"] = secrets.token_urlsafe(32)
    llm = None
    if needs_shared_llm(settings, agents):
        try:
            llm = _SharedLLM(settings, workers)
            # the shared server's slots start with the default agent's prompt
            os.environ["ATLAS_LLM_URL"] = llm.start(agents.get(None).system_prompt(local_model=True))
            os.environ["ATLAS_LLM_MODEL_NAME"] = "local"
        except Exception as e:
            # The workers start anyway and try the LLM themselves: each fails its load the same way and
            # /healthz and /readyz say `error`, as one process does (the cause is in the log, not the answer).
            logger.exception(f"the shared local LLM did not start: {e}")
            if llm is not None:
                llm.stop()
            llm = None
    # The health check's answer comes from a thread of the worker; a worker busy with its calls may still
    # take a while to be scheduled, and killing it would end them.
    config = uvicorn.Config(
        "app.server:create_app", factory=True, host=host, port=port, workers=workers, timeout_worker_healthcheck=30
    )
    sock = config.bind_socket()
    try:
        _Supervisor(config, sockets=[sock]).run()
    finally:
        sock.close()
        if llm is not None:
            llm.stop()
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
