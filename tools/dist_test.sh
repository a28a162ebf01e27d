#!/usr/bin/env bash
# Data-parallel evaluation: tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args...]
# (NNODES, NODE_RANK, MASTER_ADDR, PORT as in MMDetection; CPU-only machines use gloo.)
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NUM_PROCS [tools/test.py arguments...]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/torchrun.sh"
CONFIG=$1
CHECKPOINT=$2
NPROCS=$3
shift 3
launch_torchrun "$NPROCS" "$HERE/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
