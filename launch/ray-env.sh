# Sourced by launch/ray-head.sh and launch/ray-worker.sh: the environment every Ray process of a node
# inherits (Ray workers copy the raylet's environment), so collectives are configured once per node.
# Override any of these by exporting them before calling the scripts.
RAY=${RAY:-.venv/bin/ray}
if [ ! -x "$RAY" ]; then
  echo "no $RAY: run bash launch/setup.sh first (or set RAY=/path/to/ray)" >&2
  exit 2
fi
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Ray >= 2.5x heads require a token; a joining node only sends one when RAY_AUTH_MODE=token. Turn that on when
# a token is at hand (the head writes ~/.ray/auth_token; copy that file to each node). Never echoed.
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; }; then
  export RAY_AUTH_MODE=token
fi
# Several interfaces (docker0, lo, ib0...): pin the one the nodes reach each other on, e.g. eth0.
[ -n "${DISTUNE_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$DISTUNE_IFNAME} \
  GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$DISTUNE_IFNAME}
# Ray's object store, NCCL's shared-memory transport and DeepSpeed's CPU collectives live in /dev/shm;
# containers often give it 64 MiB. Warn early instead of failing mid-run.
shm_mib=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')
if [ -n "$shm_mib" ] && [ "$shm_mib" -lt 1024 ]; then
  echo "warning: /dev/shm is only ${shm_mib} MiB; give the container more (docker --shm-size=8g, or a Memory emptyDir)" >&2
fi
