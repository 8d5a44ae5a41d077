"""Distil on a Ray cluster: `ray job submit --working-dir . -- python jobs/distill.py --teacher CKPT --data URI ...`.

Same options as `distcls distill` (flags override a --config YAML file); prints where the best checkpoint is.
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
