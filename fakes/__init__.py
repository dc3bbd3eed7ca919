"""Local fake vendor servers (test code, reused by the benchmark): each speaks the vendor's documented
wire protocol, validates requests the way the vendor does, and can be scripted with latencies and faults."""
