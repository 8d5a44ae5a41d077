"""Pack a labeled bucket into Parquet shards on a Ray cluster:
`ray job submit --working-dir . -- python jobs/pack.py --config FILE`.

Same options as `distcls pack`; prints the summary (shards, images, rejected, images/s).
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
