"""Offline throughput benchmark: `python scripts/bench_offline_throughput.py --help` (= `python -m engine.bench`)."""

import sys

from engine.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
