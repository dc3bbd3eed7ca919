"""Entry points: the `atlas-voice` command, the HTTP server, the admin dashboard, the talk client, the report."""
