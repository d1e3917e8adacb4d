"""`cglab mlflow up`: a tracking server on a SQL store."""

from __future__ import annotations

import argparse
import signal
import sys

from cglab.track.server import make_server


def register(subparsers) -> None:
    p = subparsers.add_parser("mlflow", help="MLflow tracking server")
    sub = p.add_subparsers(dest="mlflow_command", required=True)
    up = sub.add_parser("up", help="run `mlflow server` on 127.0.0.1 with a SQL store (foreground)")
    up.add_argument("--root", default=".cglab/mlflow", help="holds mlflow.db and artifacts/ (default)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=5000)
    up.add_argument(
        "--backend-store-uri",
        default=None,
        help="default sqlite:///ROOT/mlflow.db (WAL); postgresql://... works the same",
    )
    up.add_argument("--artifacts-destination", default=None, help="default ROOT/artifacts")
    up.add_argument("--workers", type=int, default=2)
    up.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    # The server runs in its own session; turn SIGTERM into a normal exit so `finally` stops it too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = make_server(
        args.root,
        host=args.host,
        port=args.port,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        workers=args.workers,
    ).start()
    print(f"MLflow at {server.uri} (store {server.backend_store_uri}, artifacts {server.artifacts_destination})")
    print(f"export MLFLOW_TRACKING_URI={server.uri}   # Ctrl+C stops the server")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
