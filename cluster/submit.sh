#!/usr/bin/env bash
# Submit a training run as a Ray job to a running cluster and follow it until it ends:
#   cluster/submit.sh http://HEAD:8265 configs/tiny.yaml trainer.total_steps=100
# A thin wrapper around `rlsys submit CONFIG --address ADDRESS --follow --base-dir "$PWD" [key=value ...]`
# (rlsys/cluster/jobs.py: the config is validated here, the project folder and the merged config
# are shipped; exit 1 unless the job SUCCEEDED). CONFIG may be given relative to the folder you
# run this from or to the repository. A relative trainer.output_dir resolves against the folder
# you submit from (--base-dir): the driver writes it on the head node, so on a real cluster give
# an absolute path on storage that you and the head node both reach, or a storage URI.
# Real clusters keep Ray's token authentication on: RAY_AUTH_MODE=token and the cluster's token in
# RAY_AUTH_TOKEN (or the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token) where you run this.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: cluster/submit.sh DASHBOARD_ADDRESS CONFIG.yaml [key=value ...]" >&2; exit 2; }
address=$1; config=$2; shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$config" ] && [ -f "$repo/$config" ]; then config="$repo/$config"; fi
rlsys=rlsys
[ -x "$repo/.venv/bin/rlsys" ] && rlsys="$repo/.venv/bin/rlsys"
exec "$rlsys" submit "$config" --address "$address" --follow --base-dir "$(pwd)" "$@"
