#!/usr/bin/env bash
# HieraDet on a GPU in one command: correctness against birder, speed, memory, a Mask R-CNN step.
#
#   tools/device_check.sh --fetch-wheels   here, with network: what a bare GPU machine lacks -> .whl/
#   tools/device_check.sh [--out DIR]      there, from the repository root: install .whl/, check, measure
#   tools/device_check.sh --dry-run        the same code on the CPU at tiny sizes (the test suite runs it)
#
# Options: --out DIR (default $OUT, else work_dirs/device_check), --budget SECONDS (default 450:
# the whole run, installs included, ends within it), --no-mmcv-build, --only PART[,PART...] (of
# peaks, checks, flops, timings, new_size, detector; e.g. `--only detector` right after a run whose
# mmcv build did not finish in time: on the same machine the build resumes where it stopped).
# Environment: PYTHON (default python3), MAX_JOBS, TORCH_CUDA_ARCH_LIST (default: the GPU's),
# DEVICE_CHECK_WHEELS (default .whl/), DEVICE_CHECK_SITE (where they are installed, default
# /tmp/hieradet-device-site), DEVICE_CHECK_MMCV_BUILD (default /tmp/hieradet-mmcv-build: a second
# run on the same machine resumes a stopped build).
#
# The backbone parts need only torch (+ birder for the comparison). The Mask R-CNN step needs
# mmengine, mmdet and mmcv with CUDA ops; without an installed one, mmcv is compiled from the
# carried sdist while the backbone is measured, and the step is skipped (saying so) if that is not
# ready in time. Writes device_check.json, .md and .log (and mmcv_build.log) to the out folder.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The package from this working tree: a bare GPU machine has the tree, not an installed package.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
PY="${PYTHON:-python3}"
WHEELS="${DEVICE_CHECK_WHEELS:-$ROOT/.whl}"
MODE=run
OUT_DIR="${OUT:-$ROOT/work_dirs/device_check}"
BUDGET=450
MMCV_BUILD=1
ONLY=""
say() { printf '[device-check] %s\n' "$*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --fetch-wheels) MODE=fetch ;;
        --dry-run) MODE=dry-run ;;
        --out) OUT_DIR="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        --no-mmcv-build) MMCV_BUILD=0 ;;
        --only) ONLY="$2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# What the GPU machine's image lacks (Python 3.12, torch 2.11, numpy, scipy, opencv, matplotlib,
# rich, scikit-learn, safetensors, torchvision... are there), at the versions this project tests.
# setuptools<81: mmcv's setup.py imports pkg_resources. polars (54 MB, birder's result tables) is
# not carried: hieradet_mmdet.reference stands in for it, as the check never makes a table with it.
DEVICE_PYTHON="${DEVICE_PYTHON:-3.12}"
WHEEL_PINS=(mmengine==0.10.7 mmdet==3.3.0 birder==0.8.4 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.8
            termcolor==3.3.0 terminaltables==3.1.10 pycocotools==2.0.11 shapely==2.2.0 webdataset==1.0.2
            braceexpand==0.1.7 setuptools==80.10.2)
MMCV_SDIST=mmcv==2.1.0

if [ "$MODE" = fetch ]; then
    mkdir -p "$WHEELS"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
    say "downloading ${#WHEEL_PINS[@]} wheels for CPython $DEVICE_PYTHON (manylinux x86_64) and the $MMCV_SDIST sdist into $WHEELS"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" \
        --implementation cp "${platforms[@]}" -d "$WHEELS" "${WHEEL_PINS[@]}" || exit 1
    "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$WHEELS" "$MMCV_SDIST" || exit 1
    say "$(du -sh "$WHEELS" | cut -f1) in $WHEELS (the device tool carries at most 64 MiB with the working tree):"
    ls -1 "$WHEELS"
    exit 0
fi

mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/device_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

# --- packages the machine lacks, from the carried wheels ---
if [ "$MODE" = run ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE="${DEVICE_CHECK_SITE:-/tmp/hieradet-device-site}"
    say "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || say "WARNING: installing the carried wheels failed; the parts that need them will say so"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- mmcv with CUDA ops, built in the background while the backbone is measured ---
BUILD_ARGS=()
BUILD_DIR=""
stop_build() {
    if [ -n "$BUILD_DIR" ] && [ -f "$BUILD_DIR/pgid" ] && [ ! -f "$BUILD_DIR/status" ]; then
        kill -TERM -- "-$(cat "$BUILD_DIR/pgid")" 2>/dev/null
    fi
}
trap stop_build EXIT
sdist="$(ls "$WHEELS"/mmcv-*.tar.gz 2>/dev/null | head -n 1)"
if [ "$MODE" = run ] && [ "$MMCV_BUILD" = 1 ]; then
    MMCV_OPS=cpu MMCV_NOTE="" MMCV_CPATH="" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-}"
    eval "$("$PY" tools/mmcv_build.py 2>/dev/null)"
    if "$PY" -c 'import mmcv.ops, sys; sys.exit(mmcv.ops.get_compiling_cuda_version() == "not available")' 2>/dev/null; then
        say "mmcv with CUDA ops is installed already: no build"
    elif [ -z "$sdist" ]; then
        say "no mmcv sdist in $WHEELS (tools/device_check.sh --fetch-wheels): the Mask R-CNN step will be skipped"
    elif [ "$MMCV_OPS" != cuda ]; then
        say "not building mmcv's CUDA ops: ${MMCV_NOTE:-no GPU or no nvcc}; the Mask R-CNN step will be skipped"
    elif ! "$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        say "not building mmcv: this Python has no headers (Python.h); the Mask R-CNN step will be skipped"
    else
        # A fixed folder: a second run on the same machine carries on where a stopped build left off.
        BUILD_DIR="${DEVICE_CHECK_MMCV_BUILD:-/tmp/hieradet-mmcv-build}"
        rm -f "$BUILD_DIR/status" "$BUILD_DIR/pgid"
        if [ ! -f "$BUILD_DIR/src/setup.py" ]; then
            rm -rf "$BUILD_DIR" && mkdir -p "$BUILD_DIR"
            tar -xzf "$sdist" -C "$BUILD_DIR" && mv "$BUILD_DIR"/mmcv-* "$BUILD_DIR/src"
            # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes c++14/c++17 (as tools/setup_env.sh).
            sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$BUILD_DIR/src/setup.py"
        fi
        BUILD_ARGS=(--mmcv-build "$BUILD_DIR")
        if ls "$BUILD_DIR"/src/mmcv/_ext*.so >/dev/null 2>&1; then
            say "mmcv's CUDA ops were built by an earlier run: $BUILD_DIR"
            echo 0 > "$BUILD_DIR/status"
        else
            JOBS="${MAX_JOBS:-$(nproc)}"
            say "building mmcv's CUDA ops for $TORCH_CUDA_ARCH_LIST with $JOBS jobs in the background (niced; about $MMCV_BUILD_MINUTES min): $BUILD_DIR"
            # Its own session, so that stopping it stops ninja and every compiler under it.
            env MMCV_WITH_OPS=1 FORCE_CUDA=1 MAX_JOBS="$JOBS" TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
                CUDA_HOME="$MMCV_CUDA_HOME" CPATH="$MMCV_CPATH${CPATH:+:$CPATH}" \
                PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH" \
                setsid bash -c 'echo $$ > "$0/pgid"; cd "$0/src" && nice -n 19 "$1" setup.py build_ext --inplace \
                    > "$0/build.log" 2>&1; echo $? > "$0/status"' "$BUILD_DIR" "$PY" &
            for _ in $(seq 50); do [ -f "$BUILD_DIR/pgid" ] && break; sleep 0.1; done
        fi
    fi
fi

ELAPSED=$(( $(date +%s) - START ))
DEADLINE=$(( START + BUDGET ))
say "$ELAPSED s spent on setup; checks and measurements until $(date -d "@$DEADLINE" +%H:%M:%S 2>/dev/null || echo "+$((BUDGET - ELAPSED)) s")"
PY_ARGS=(--out "$OUT_DIR" --deadline "$DEADLINE" "${BUILD_ARGS[@]}")
[ "$MODE" = dry-run ] && PY_ARGS+=(--dry-run)
[ -n "$ONLY" ] && PY_ARGS+=(--parts "$ONLY")
PYTHONUNBUFFERED=1 "$PY" tools/device_check.py "${PY_ARGS[@]}"
rc=$?
stop_build
if [ -n "$BUILD_DIR" ] && [ -f "$BUILD_DIR/build.log" ]; then
    tail -c 400000 "$BUILD_DIR/build.log" > "$OUT_DIR/mmcv_build.log"
fi
say "done in $(( $(date +%s) - START )) s (exit $rc); results in $OUT_DIR"
exit $rc
