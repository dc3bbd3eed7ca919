"""Where Atlas relies on Pipecat's internals (pipecat.py), and nowhere else."""
