"""The speech engines: one folder per cloud vendor, the local engines, the factory that picks them."""
