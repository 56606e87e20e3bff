#!/usr/bin/env bash
# Start the Ray head of a distune cluster on this machine (bare nodes, no Kubernetes).
#
#   bash launch/ray-head.sh [--node-ip IP] [--port 6379] [--dashboard-host 127.0.0.1] [--dashboard-port 8265]
#                           [--gpus N] [--cpus N] [--shm-check] [-- extra `ray start` arguments]
#
# Defaults keep everything on loopback (a one-machine cluster): pass --node-ip <this node's private address>
# for other machines to join. The dashboard (and with it the Jobs API that `distune submit` uses) stays on
# 127.0.0.1 unless --dashboard-host says otherwise: reach it through `ssh -L 8265:127.0.0.1:8265 head`.
# Another Ray on the same machine holds the dashboard agent's default port (52365): then pass
# `-- --dashboard-agent-listen-port=<free port>`, or `distune submit` gets "No available agent to submit job".
# Ray >= 2.5x enables token auth; the token lands in ~/.ray/auth_token on this node: copy it to the workers and
# to the machine you submit from (never into a config). Prints the commands to join and to submit.
set -euo pipefail
cd "$(dirname "$0")/.."
NODE_IP=127.0.0.1 PORT=6379 DASH_HOST=127.0.0.1 DASH_PORT=8265 GPUS="" CPUS="" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --node-ip) NODE_IP=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --dashboard-host) DASH_HOST=$2; shift 2 ;;
    --dashboard-port) DASH_PORT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "ray-head.sh: unknown option $1 (see the header of this script)" >&2; exit 2 ;;
  esac
done
. launch/ray-env.sh
args=(--head --node-ip-address="$NODE_IP" --port="$PORT" --include-dashboard=true
      --dashboard-host="$DASH_HOST" --dashboard-port="$DASH_PORT" --disable-usage-stats)
[ -n "$GPUS" ] && args+=(--num-gpus="$GPUS")
[ -n "$CPUS" ] && args+=(--num-cpus="$CPUS")
echo "join from a worker node:  bash launch/ray-worker.sh --head $NODE_IP:$PORT --node-ip <that node's address>"
echo "submit (from here):       .venv/bin/distune submit CFG --address http://$DASH_HOST:$DASH_PORT"
exec "$RAY" start "${args[@]}" "${EXTRA[@]}"
