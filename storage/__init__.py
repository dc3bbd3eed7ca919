"""Session and turn rows: built in records.py, kept in the outbox, stored by a sink."""

from __future__ import annotations

from config.settings import Settings, secret
from storage.outbox import Recorder
from storage.sinks import Sink, SQLiteSink


def make_sink(settings: Settings) -> Sink:
    """Supabase when SUPABASE_URL is set, else the embedded SQLite file."""
    if settings.supabase_url:
        from storage.supabase import SupabaseSink

        return SupabaseSink(
            settings.supabase_url,
            secret(settings.supabase_service_role_key),
            timeout_secs=settings.db_timeout_secs,
            anon_key=secret(settings.supabase_anon_key),
        )
    return SQLiteSink(settings.resolved_sqlite_path)


def make_recorder(settings: Settings) -> Recorder:
    return Recorder(
        make_sink(settings),
        settings.resolved_outbox_path,
        max_backoff_secs=settings.outbox_max_backoff_secs,
        max_bytes=int(settings.outbox_max_mb * (1 << 20)),
        dead_retention_secs=settings.dead_letter_retention_days * 86400,
        transcript_retention_secs=settings.transcript_retention_days * 86400 or None,
    )
