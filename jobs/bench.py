"""Benchmarks on a Ray cluster: `ray job submit --working-dir . -- python jobs/bench.py all --out bench.json`.

Same options as `distcls bench` (train, label, serve, transfer or all); prints each table and writes every
figure, ratio, the machine and the settings to --out.
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
