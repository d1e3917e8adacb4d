"""Entry point for `ray job submit -- python jobs/ablate.py --lesson N [--preset P] [--config YAML]`; on a cluster
`--preset cluster --config jobs/configs/cluster_data.yaml` (the data in object storage; that preset has no corpus).

Connects to the cluster named by RAY_ADDRESS (set by `ray job submit`) and runs the same code as
`cglab ablate`; MLflow comes from $MLFLOW_TRACKING_URI or --tracking-uri.
"""

import os
import sys

# The submitted checkout's code, not whatever cglab the cluster image has installed.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from cglab.ablate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())  # `--lesson N` as well as the positional form of `cglab ablate N` (cglab.ablate.parse)
