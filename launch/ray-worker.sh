#!/usr/bin/env bash
# Join a worker node to the distune Ray cluster started by launch/ray-head.sh.
#
#   bash launch/ray-worker.sh --head HEAD_IP:PORT [--node-ip IP] [--gpus N] [--cpus N] [-- extra `ray start` args]
#
# --node-ip: the address the other nodes reach this one at (the interface NCCL/gloo use too; set
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME in launch/ray-env.sh's environment when a node has several).
# With token auth (Ray's default), ~/.ray/auth_token must hold the head's token (or RAY_AUTH_TOKEN be set).
set -euo pipefail
cd "$(dirname "$0")/.."
HEAD="" NODE_IP=127.0.0.1 GPUS="" CPUS="" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --head) HEAD=$2; shift 2 ;;
    --node-ip) NODE_IP=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "ray-worker.sh: unknown option $1 (see the header of this script)" >&2; exit 2 ;;
  esac
done
if [ -z "$HEAD" ]; then
  echo "ray-worker.sh: --head HEAD_IP:PORT is required (printed by launch/ray-head.sh)" >&2
  exit 2
fi
. launch/ray-env.sh
args=(--address="$HEAD" --node-ip-address="$NODE_IP" --disable-usage-stats)
[ -n "$GPUS" ] && args+=(--num-gpus="$GPUS")
[ -n "$CPUS" ] && args+=(--num-cpus="$CPUS")
exec "$RAY" start "${args[@]}" "${EXTRA[@]}"
