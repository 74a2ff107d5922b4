#!/usr/bin/env bash
# Submit a training run as a Ray job to a running cluster:
#   cluster/submit.sh http://HEAD:8265 configs/tiny.yaml trainer.total_steps=100
# The job's driver runs `rlsys train` on the head node, which must have rlsys installed
# (./dev.sh setup, or pip install -e '.[gpu]' on GPU nodes); the repository folder is shipped as
# the job's working directory, so configs/ and data paths resolve as they do locally.
# Real clusters keep Ray's token authentication on: export RAY_AUTH_TOKEN (or the token file)
# where you run this.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: cluster/submit.sh DASHBOARD_ADDRESS CONFIG.yaml [key=value ...]" >&2; exit 2; }
address=$1; shift
cd "$(dirname "$0")/.."
exec ray job submit --address "$address" --working-dir . -- rlsys train "$@" cluster.address=auto
