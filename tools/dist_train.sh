#!/usr/bin/env bash
# Data-parallel training: tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]
# (NNODES, NODE_RANK, MASTER_ADDR, PORT as in MMDetection; CPU-only machines use gloo.)
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 CONFIG NUM_PROCS [tools/train.py arguments...]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/torchrun.sh"
CONFIG=$1
NPROCS=$2
shift 2
launch_torchrun "$NPROCS" "$HERE/train.py" "$CONFIG" --launcher pytorch "$@"
