#!/usr/bin/env bash
# A two-node Ray cluster on this machine, for trying `cluster.address` and `ray job submit`
# without real hardware: a head node and one worker node with their own logical CPUs.
#   cluster/start_local.sh        # start;  cluster/start_local.sh stop   # stop both
# Authentication is off here (local only); keep it on for real clusters. A plain `rlsys train`
# on this machine still starts its own cluster; pass cluster.address=127.0.0.1:6379 to use this one.
set -euo pipefail
export RAY_AUTH_MODE=disabled
repo=$(cd "$(dirname "$0")/.." && pwd)
# The job drivers and actors this cluster starts must find the project's environment (rlsys, ray).
[ -d "$repo/.venv/bin" ] && export PATH="$repo/.venv/bin:$PATH"
if [ "${1:-}" = stop ]; then exec ray stop --force; fi
ray start --head --num-cpus=4 --port=6379 --dashboard-host=127.0.0.1 --include-dashboard=true
ray start --address=127.0.0.1:6379 --num-cpus=4
echo "cluster up: rlsys train configs/tiny.yaml cluster.address=127.0.0.1:6379"
echo "       or: cluster/submit.sh http://127.0.0.1:8265 configs/tiny.yaml"
