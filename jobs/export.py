"""Export on a Ray cluster: `ray job submit --working-dir . -- python jobs/export.py --checkpoint CKPT --out URI ...`.

Same options as `distcls export`; prints the export's directory and its top-1 agreement on real images.
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
