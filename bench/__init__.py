"""`atlas-voice bench`: the load and latency benchmark, the fuzzers and their server harness (see
bench/README.md). It drives a real server against the vendor fakes (fakes/); results go to bench/results/.
"""
