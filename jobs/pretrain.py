"""Entry point for `ray job submit`:

    ray job submit --working-dir . -- python jobs/pretrain.py jobs/configs/<name>.yaml [key=value ...]

Connects to the cluster in RAY_ADDRESS (set by the job server) and runs the same code as `cglab train`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from cglab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
