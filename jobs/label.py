"""Label a bucket on a Ray cluster: `ray job submit --working-dir . -- python jobs/label.py --config FILE`.

Same options as `distcls label`; prints the summary (objects, labeled, errors by kind, images/s).
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
