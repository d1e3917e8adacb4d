"""Entry point for `ray job submit -- python jobs/ablate.py --lesson N [--preset cluster]`.

Connects to the cluster named by RAY_ADDRESS (set by `ray job submit`) and runs the same code as
`cglab ablate`; MLflow comes from $MLFLOW_TRACKING_URI or --tracking-uri.
"""
import argparse
import sys

from cglab.tune.cli import main

if __name__ == "__main__":
    # Accept `--lesson N` as well as the positional form of `cglab ablate N`.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--lesson", default=None)
    known, rest = pre.parse_known_args(sys.argv[1:])
    sys.exit(main(([known.lesson] if known.lesson else []) + rest))
