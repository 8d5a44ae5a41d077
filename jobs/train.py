"""Fine-tune on a Ray cluster: `ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.yaml`.

Same options as `distcls train` (flags override the YAML file); prints where the best checkpoint is.
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
