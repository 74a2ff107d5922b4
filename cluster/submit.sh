#!/usr/bin/env bash
# Submit a training run as a Ray job to a running cluster:
#   cluster/submit.sh http://HEAD:8265 configs/tiny.yaml trainer.total_steps=100
# The job's driver runs `rlsys train` on the head node, which must have rlsys installed
# (./dev.sh setup, or pip install -e '.[gpu]' on GPU nodes); the repository folder is shipped as
# the job's working directory, so configs/ and data paths resolve as they do locally.
# The run folder: a relative trainer.output_dir resolves against the folder you submit from
# (RLSYS_BASE_DIR), not against Ray's temporary copy of the working dir, which Ray deletes. The
# driver writes it on the head node: on a real cluster, give an absolute trainer.output_dir on
# storage that you and the head node both reach (and cluster.shared_storage=true when every node
# mounts it; otherwise checkpoints are sent from the learner's node to the driver).
# Real clusters keep Ray's token authentication on: export RAY_AUTH_TOKEN (or the token file)
# where you run this.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: cluster/submit.sh DASHBOARD_ADDRESS CONFIG.yaml [key=value ...]" >&2; exit 2; }
address=$1; shift
base=$(pwd)
base=${base//\\/\\\\}; base=${base//\"/\\\"}  # a JSON string: backslashes and quotes escaped
cd "$(dirname "$0")/.."
exec ray job submit --address "$address" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"RLSYS_BASE_DIR\": \"$base\"}}" -- rlsys train "$@"
