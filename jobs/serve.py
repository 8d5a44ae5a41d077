"""Deploy the online endpoint on a Ray cluster and return:
`ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/serve.yaml`.

Same options as `distcls serve`. The application keeps running after the job ends; `serve status` shows
it, `serve shutdown` removes it. DISTCLS_API_TOKEN in the cluster's environment (a Secret, never a runtime
env) turns on bearer-token auth; on a host other than loopback (the config's 0.0.0.0) the job refuses to
deploy without it, unless --no-auth says so explicitly.
"""

import sys

from distcls.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
