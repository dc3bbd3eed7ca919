"""`atlas-voice bench`: the load and latency benchmark (see bench/README.md).

It runs from a clone of the repository: the vendor fakes it drives the server against live in
tests/fakes (test code), and results are written under bench/results/.
"""
