#!/usr/bin/env bash
# A two-node Ray cluster on this machine, for trying `cluster.address` and `ray job submit`
# without real hardware: a head node with no CPUs and one worker node with 8 logical CPUs, so
# every actor runs on the worker while a driver attaches to the head, as on a real cluster
# (learner rank 0 on another node than the driver: checkpoints are sent to the driver).
#   cluster/start_local.sh        # start (GCS 127.0.0.1:6379, dashboard http://127.0.0.1:8265)
#   cluster/start_local.sh pools  # the same head, and two worker nodes of 8 CPUs: one declaring
#                                 # the custom resource `rollout`, one `learner`, for trying
#                                 # cluster.placement=disaggregated (generators on the first,
#                                 # learners on the second)
#   cluster/start_local.sh stop   # stop this cluster, and only it (either kind, and the --isolated one)
#   cluster/start_local.sh --isolated [pools]  # the same nodes, each a machine of its own as far as it
#                                 # can tell (root): its own address 10.213.<k>.<n>, /tmp, home and
#                                 # cores (rlsys/cluster/isolation.py), run by
#                                 # `python -m rlsys.cluster.local --isolated [--pools]` in the
#                                 # background; it prints the commands that reach the cluster: a driver
#                                 # runs on the head (nsenter), `rlsys submit` from the host's side of the
#                                 # cluster network (ip netns exec). Stopped by `cluster/start_local.sh stop`.
# Other ports: RAY_PORT=... DASHBOARD_PORT=... AGENT_PORT=... cluster/start_local.sh (RAY_PORT for stop too).
# The --isolated cluster's state folder: ISOLATED_STATE=... (for stop too).
# Each node is a `ray start --block` in a session of its own; stop kills those process groups.
# Never `ray stop` here: it kills every Ray process on the machine, other people's runs too.
# Authentication is off here (local only); keep it on for real clusters. A plain `rlsys train`
# on this machine still starts its own cluster; pass cluster.address=127.0.0.1:6379 to use this one.
set -euo pipefail
export RAY_AUTH_MODE=disabled
repo=$(cd "$(dirname "$0")/.." && pwd)
# The job drivers and actors this cluster starts must find the project's environment (rlsys, ray).
[ -d "$repo/.venv/bin" ] && export PATH="$repo/.venv/bin:$PATH"
port=${RAY_PORT:-6379}
dashboard=${DASHBOARD_PORT:-8265}
agent=${AGENT_PORT:-52365}                # the head's dashboard agent; the workers' are the next ports
state="$repo/.cache/local-cluster/$port"  # pids and logs of the cluster on this port
marker=/tmp/ray/ray_current_cluster       # where a plain ray.init() looks for a cluster

alive() {  # the recorded `ray start` process is still running (not a reused pid)
  [ -f "$state/$1.pid" ] && ps -o args= -p "$(cat "$state/$1.pid")" 2>/dev/null | grep -q "ray start"
}

iso=${ISOLATED_STATE:-$repo/.cache/local-cluster/isolated}  # the --isolated cluster: harness pid, nodes' logs
iso_alive() {  # the recorded harness (python -m rlsys.cluster.local) is still running
  [ -f "$iso/harness.pid" ] && ps -o args= -p "$(cat "$iso/harness.pid")" 2>/dev/null | grep -q "rlsys.cluster.local"
}

stop_isolated() {
  if iso_alive; then
    pid=$(cat "$iso/harness.pid")
    kill -TERM "$pid"  # the harness stops every process of every node and takes the namespaces down
    for _ in $(seq 240); do iso_alive || break; sleep 0.5; done
    if iso_alive; then echo "the isolated cluster's harness (pid $pid) did not stop within 120s" >&2; exit 1; fi
    echo "stopped the isolated cluster (harness $pid)"
  fi
  rm -f "$iso/harness.pid"
}

start_isolated() {  # pools or nothing
  if iso_alive; then echo "an isolated cluster started by this script runs; cluster/start_local.sh stop first" >&2; exit 1; fi
  mkdir -p "$iso"
  : >"$iso/harness.log"
  setsid python3 -m rlsys.cluster.local --isolated ${1:+--pools} --folder "$iso/nodes" \
    >>"$iso/harness.log" 2>&1 </dev/null &
  echo $! >"$iso/harness.pid"
  for _ in $(seq 480); do
    if grep -q "^cluster up" "$iso/harness.log"; then sed -n '/^cluster up/,$p' "$iso/harness.log"; return 0; fi
    if ! iso_alive; then echo "the isolated cluster did not start:" >&2; tail -20 "$iso/harness.log" >&2; exit 1; fi
    sleep 0.5
  done
  echo "the isolated cluster was not up within 240s (log: $iso/harness.log)" >&2; stop_isolated; exit 1
}

stop() {
  for node in worker rollout learner head; do
    if alive "$node"; then
      pid=$(cat "$state/$node.pid")
      kill -KILL -- "-$pid" || true  # the whole process group: raylet and gcs_server ignore SIGTERM
      for _ in $(seq 60); do ps -o pid= -g "$pid" >/dev/null || break; sleep 0.5; done
      echo "stopped the $node node (process group $pid)"
    fi
    rm -f "$state/$node.pid"
  done
  # Actors and job drivers run in process groups of their own and exit when their raylet dies.
  if [ -f "$marker" ] && grep -q ":$port\$" "$marker"; then rm -f "$marker"; fi
}

start_node() {  # name, then `ray start` arguments
  local name=$1; shift
  # Not a process group leader here (no job control), so setsid runs ray in this pid.
  : >"$state/$name.log"
  setsid ray start --block --disable-usage-stats "$@" >>"$state/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
  for _ in $(seq 240); do
    grep -q "Ray runtime started" "$state/$name.log" && return 0
    if ! alive "$name"; then
      echo "the $name node did not start:" >&2; tail -20 "$state/$name.log" >&2; stop; exit 1
    fi
    sleep 0.5
  done
  echo "the $name node was not up within 120s (log: $state/$name.log)" >&2; stop; exit 1
}

case ${1:-} in
  stop) stop; stop_isolated; exit 0;;
  --isolated)
    case ${2:-} in
      "") start_isolated ""; exit 0;;
      pools) start_isolated pools; exit 0;;
    esac;;
  ""|pools) ;;
esac
if [ $# -gt 1 ] || { [ $# = 1 ] && [ "$1" != pools ]; }; then
  echo "usage: cluster/start_local.sh [--isolated] [pools] | stop" >&2; exit 2
fi
if alive head || alive worker || alive rollout || alive learner; then
  echo "a cluster started by this script runs on port $port; cluster/start_local.sh stop first" >&2; exit 1
fi
mkdir -p "$state"
# Each node's dashboard agent needs a port of its own (both default to 52365); the head's serves jobs.
start_node head --head --num-cpus=0 --port="$port" --include-dashboard=true --dashboard-host=127.0.0.1 \
  --dashboard-port="$dashboard" --dashboard-agent-listen-port="$agent"
if [ "${1:-}" = pools ]; then
  start_node rollout --address="127.0.0.1:$port" --num-cpus=8 --resources='{"rollout": 1}' \
    --dashboard-agent-listen-port="$((agent + 1))"
  start_node learner --address="127.0.0.1:$port" --num-cpus=8 --resources='{"learner": 1}' \
    --dashboard-agent-listen-port="$((agent + 2))"
  placement=" cluster.placement=disaggregated"
else
  start_node worker --address="127.0.0.1:$port" --num-cpus=8 --dashboard-agent-listen-port="$((agent + 1))"
  placement=""
fi
echo "cluster up (logs in $state): rlsys train configs/tiny.yaml cluster.address=127.0.0.1:$port$placement"
echo "       or: cluster/submit.sh http://127.0.0.1:$dashboard configs/tiny.yaml$placement"
echo "       or: rlsys submit configs/tiny.yaml$placement trainer.output_dir=\$PWD/runs/local --address http://127.0.0.1:$dashboard"
