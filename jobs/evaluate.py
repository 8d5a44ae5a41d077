"""Evaluate a checkpoint on a Ray cluster: `ray job submit --working-dir . -- python jobs/evaluate.py --config FILE`.

Same options as `distcls evaluate`; writes report.json, report.md and confusion_matrix.png.
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
