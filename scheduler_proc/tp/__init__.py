"""Tensor parallelism: the process group and its collectives (group.py), the step rank 0 hands the other
ranks (step_broadcast.py), rank 0's worker processes (workers.py) and a worker's own loop (worker_main.py)."""
