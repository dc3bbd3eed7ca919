"""The doors: how a caller reaches the agent. websocket/ (`/ws`, the Atlas protocol), twilio/ (phone calls),
daily/ (Daily rooms), and what they share (common.py)."""
