"""The agent: the one pipeline (pipeline.py), one conversation on any door (session.py), what a process
loads once (runtime.py), the abuse limits (limits.py) and token checks (auth.py)."""
