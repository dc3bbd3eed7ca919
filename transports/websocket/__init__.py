"""The browser door: `/ws`, the Atlas protocol (docs/PROTOCOL.md)."""
