#!/usr/bin/env bash
# cglab on one machine (laptop or a single GPU box): a Ray head plus an MLflow server, both on 127.0.0.1.
#
#   clusters/local.sh start     # Ray head + MLflow; prints the addresses
#   python -m cglab.track.submit -- python jobs/ablate.py --lesson 3 --preset laptop
#   clusters/local.sh stop      # stops only what `start` started (by the PIDs it recorded)
#
# Assumes: run from the repo root with .venv built (`make install`); ports 6379, 8265, 8080, 10001 and 5000 free
# (override with RAY_PORT, DASHBOARD_PORT, METRICS_PORT, CLIENT_PORT, MLFLOW_PORT; RAY_START_ARGS adds flags, e.g.
# the agent ports or --temp-dir when several Ray heads share a machine, as in tests/clusters).
# What listens where (checked by tests/clusters/test_submit.py against Ray 2.60): the dashboard + job API (8265)
# and MLflow (5000) bind 127.0.0.1 only. Ray's GCS (6379), client server (10001) and Prometheus metrics endpoint
# (8080) also bind the machine's network address whatever --node-ip-address says, so token auth is on
# (RAY_AUTH_MODE=token; the token is generated into ~/.ray/auth_token on first start) and on a shared network a host
# firewall should keep 6379, 10001 and 8080 closed.
set -euo pipefail

STATE=${CGLAB_STATE:-.cglab/local}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
METRICS_PORT=${METRICS_PORT:-8080}
CLIENT_PORT=${CLIENT_PORT:-10001}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
BIN=${BIN:-.venv/bin}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# `ray job stop` is a preemption (SIGTERM, a checkpoint at the next step) only if the job supervisor waits longer than
# train.preempt_grace_s before its SIGKILL (Ray's default: 3 s). cglab.config.JOB_STOP_WAIT_S.
export RAY_JOB_STOP_WAIT_TIME_S=${RAY_JOB_STOP_WAIT_TIME_S:-600}

start() {
  mkdir -p "$STATE/mlflow"
  STATE=$(cd "$STATE" && pwd)
  if [ "$RAY_AUTH_MODE" = token ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    "$BIN/ray" get-auth-token --generate >/dev/null
  fi
  # No custom temp dir here: Ray's default /tmp/ray keeps unix socket paths short. --block in its own session
  # lets `stop` end exactly this head's process group (plain `ray stop` would stop every Ray on the machine).
  setsid nohup "$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT" \
    --metrics-export-port="$METRICS_PORT" --resources='{"cglab_driver": 4}' --disable-usage-stats \
    ${RAY_START_ARGS:-} \
    >"$STATE/ray.log" 2>&1 &
  echo $! >"$STATE/ray.pid"
  # MLflow on a SQL store, local artifacts. 127.0.0.1: nobody else on the network can read or write runs. Without
  # MLflow's job execution (eight huey processes, ~2 GB, that cglab never uses: cglab.track.server.SERVER_ENV).
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} setsid nohup "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
    --artifacts-destination "$STATE/mlflow/artifacts" >"$STATE/mlflow.log" 2>&1 &
  echo $! >"$STATE/mlflow.pid"
  for _ in $(seq 60); do
    curl -s -o /dev/null "http://127.0.0.1:$DASHBOARD_PORT/api/version" && break
    sleep 1
  done
  cat <<MSG
Ray dashboard / jobs: http://127.0.0.1:$DASHBOARD_PORT   (export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT)
Ray metrics:          http://127.0.0.1:$METRICS_PORT/metrics
MLflow UI:            http://127.0.0.1:$MLFLOW_PORT       (export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT)
MSG
}

stop() {
  for name in mlflow ray; do
    [ -s "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true  # the process group `start` created, nothing else
    # Ray's head takes ~30 s to shut its processes down; wait for it (STOP_WAIT_S, default 60), then insist.
    for _ in $(seq "${STOP_WAIT_S:-60}"); do ps -o stat= -s "$pid" | grep -qv '^Z' || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$STATE/$name.pid"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
