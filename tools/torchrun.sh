# Sourced by dist_train.sh / dist_test.sh: launch_torchrun NUM_PROCS SCRIPT [ARGS...]
# One process per GPU; on a machine without GPUs NUM_PROCS CPU processes over gloo.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every node.
launch_torchrun() {
    local nprocs=$1
    shift
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    # The repository's .venv unless PYTHON names another interpreter.
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$here/../.venv/bin/python" ]; then PYTHON="$here/../.venv/bin/python"; else PYTHON=python3; fi
    fi
    export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --nproc_per_node="$nprocs" --master_port="${PORT:-29500}" "$@"
}
