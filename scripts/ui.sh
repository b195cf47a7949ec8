#!/usr/bin/env bash
# `make ui`: the Dagster UI (`dagster dev`: webserver + daemon, so schedules and sensors can run) and
# the MLflow UI on the project's embedded stores, both bound to 127.0.0.1. Ctrl-C stops both.
#
# Each server runs in its own process group (job control, `set -m`), so a Ctrl-C reaches only this
# script, which then stops them: `dagster dev` gets SIGINT and stops its webserver and daemon (its
# code server, if still there once it exits, gets SIGTERM); MLflow's whole group gets SIGTERM.
# Without job control bash starts background jobs with SIGINT ignored, and `dagster dev` maps
# SIGTERM to its SIGINT handler: it would ignore both. Whatever is still alive after
# $UI_STOP_TIMEOUT seconds gets SIGKILL, by process group. If either server exits on its own, the
# other is stopped too and the script fails.
#
# Settings: DAGSTER_PORT (3000), MLFLOW_PORT (5000), PRECOMPUTE_HOME (./var), DAGSTER_HOME
# ($PRECOMPUTE_HOME/dagster_home), MLFLOW_TRACKING_URI (sqlite:///$PRECOMPUTE_HOME/mlflow.db; a
# remote tracking server is not started here, only named), VENV (.venv), UI_STOP_TIMEOUT (60).
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
export PRECOMPUTE_HOME=${PRECOMPUTE_HOME:-$PWD/var}
export DAGSTER_HOME=${DAGSTER_HOME:-$PRECOMPUTE_HOME/dagster_home}
DAGSTER_PORT=${DAGSTER_PORT:-3000}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PRECOMPUTE_HOME/mlflow.db}
STOP_TIMEOUT=${UI_STOP_TIMEOUT:-60}
mkdir -p "$DAGSTER_HOME"
# the embedded instance sends no usage statistics (and prints no telemetry banner); as pipelines/local.py
grep -qs '^telemetry:' "$DAGSTER_HOME/dagster.yaml" || printf '\ntelemetry:\n  enabled: false\n' >> "$DAGSTER_HOME/dagster.yaml"

[ -x "$VENV/bin/dagster" ] || { echo "ui.sh: $VENV/bin/dagster missing: run make ui (it installs .venv)" >&2; exit 2; }

DAGSTER_PID="" MLFLOW_PID=""

alive() { kill -0 -- "-$1" 2>/dev/null; }  # anything left in process group $1

stop_group() {  # stop_group PGID SIGNAL TARGET NAME; TARGET: "leader" (the pid) or "group"
  local pgid=$1 sig=$2 target=$3 name=$4 termed=0 deadline=$((SECONDS + STOP_TIMEOUT))
  [ -n "$pgid" ] && alive "$pgid" || return 0
  if [ "$target" = group ]; then kill "-$sig" -- "-$pgid" 2>/dev/null; else kill "-$sig" "$pgid" 2>/dev/null; fi
  while alive "$pgid" && [ "$SECONDS" -lt "$deadline" ]; do
    if [ "$termed" = 0 ] && ! kill -0 "$pgid" 2>/dev/null; then
      kill -TERM -- "-$pgid" 2>/dev/null  # the leader is done; helpers it left (a code server) get SIGTERM
      termed=1
    fi
    sleep 0.2
  done
  if alive "$pgid"; then
    echo "ui.sh: $name still running after ${STOP_TIMEOUT}s: SIGKILL to its process group" >&2
    kill -KILL -- "-$pgid" 2>/dev/null
  fi
}

STOPPING=0
stop_all() {
  [ "$STOPPING" = 1 ] && return
  STOPPING=1
  trap '' INT TERM  # a second Ctrl-C must not cut the clean stop short
  echo "ui.sh: stopping Dagster and MLflow ..." >&2
  stop_group "$DAGSTER_PID" INT leader dagster &
  stop_group "$MLFLOW_PID" TERM group mlflow &
  wait
  echo "ui.sh: stopped" >&2
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all' EXIT

# With job control each background job is its own process group: $! is the server's pid and pgid.
set -m
"$VENV/bin/dagster" dev -h 127.0.0.1 -p "$DAGSTER_PORT" -w workspace.yaml </dev/null &
DAGSTER_PID=$!
case "$MLFLOW_URI" in
  sqlite:*|file:*|/*)
    "$VENV/bin/mlflow" ui --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "$MLFLOW_URI" </dev/null &
    MLFLOW_PID=$!
    echo "Dagster UI: http://127.0.0.1:$DAGSTER_PORT   MLflow UI: http://127.0.0.1:$MLFLOW_PORT   (Ctrl-C stops both)" ;;
  *)
    echo "Dagster UI: http://127.0.0.1:$DAGSTER_PORT   MLflow: $MLFLOW_URI (not started here)   (Ctrl-C stops)" ;;
esac
set +m

# Returns when a server exits or a trapped signal arrives (the trap then stops everything).
wait -n
status=$?
echo "ui.sh: a server exited (status $status); stopping the other" >&2
stop_all
exit 1
