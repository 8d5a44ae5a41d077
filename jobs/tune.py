"""Search hyperparameters on a Ray cluster:
`ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune.yaml`.

Same options as `distcls tune` (flags override the YAML file): Ray Tune trials, each a whole `distcls train`
run (Ray Train workers) with ASHA stopping the weak ones; prints the best trial and the search directory.
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
