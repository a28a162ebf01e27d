#!/usr/bin/env bash
# Creates (or completes) .venv with the pinned stack this project is tested on.
# Idempotent: each step checks what is installed; the mmcv wheel, the slow part,
# is built once per (mmcv, torch, python, cuda) and cached outside the repo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY_BOOT="${PYTHON:-python3.11}"
CACHE="${HIERADET_MMDET_CACHE:-$HOME/.cache/hieradet-mmdet}"

TORCH_VERSION=2.15.0
TORCHVISION_VERSION=0.29.2
NUMPY_SPEC=
MMENGINE_DIST=mmengine MMENGINE_VERSION=0.10.7
MMCV_VERSION=2.1.0
MMDET_DIST=mmdet MMDET_VERSION=3.3.0
BIRDER_VERSION=0.8.4
SETUPTOOLS_PIN='setuptools>=77,<81'
# The other stacks tested (docs/installation.md), each in a venv outside the repo keyed by its versions,
# without birder (its reference numbers come from the current stack: tools/test_stack.sh).
#   floor: the oldest, as MMDetection 3.3 users commonly run it (mmcv built against torch 2.1 as released).
#   fork:  the maintained community fork's mmengine and mmdetection (same module names) on the current
#          torch, with the current stack's mmcv 2.1.0 wheel (its onedl-mmcv 2.3.6 would be a third
#          source build in CI: docs/installation.md); OpenMMLab's mmengine must not be installed beside it.
STACK="${STACK:-current}"
case "$STACK" in
    current) ;;
    floor)
        TORCH_VERSION=2.1.2 TORCHVISION_VERSION=0.16.2 NUMPY_SPEC=numpy==1.26.4
        PY_BOOT="${FLOOR_PYTHON:-python3.10}"
        "$PY_BOOT" -c '' 2>/dev/null || PY_BOOT="$(ls -d "$HOME"/.pyenv/versions/3.10.*/bin/python 2>/dev/null | tail -n 1)"
        ;;
    fork)
        MMENGINE_DIST=onedl-mmengine MMENGINE_VERSION=0.10.12 MMDET_DIST=onedl-mmdetection MMDET_VERSION=3.5.1
        ;;
    *) echo "[setup] STACK=$STACK is not a stack here (current, floor, fork)" >&2; exit 2 ;;
esac
if [ "$STACK" != current ]; then
    PY_VERSION="$("$PY_BOOT" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    VENV="$CACHE/envs/$STACK-py$PY_VERSION-torch$TORCH_VERSION-mmcv$MMCV_VERSION-$MMENGINE_DIST$MMENGINE_VERSION-$MMDET_DIST$MMDET_VERSION"
fi

# tools/test_stack.sh asks where a stack's venv is.
if [ "${SETUP_PRINT_VENV:-}" = 1 ]; then echo "$VENV"; exit 0; fi

say() { printf '[setup] %s\n' "$*"; }
stage_start=$(date +%s)
stage_done() { say "$1 took $(( ($(date +%s) - stage_start) / 60 )) min"; stage_start=$(date +%s); }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PY_BOOT"
    "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --quiet)
# Installs go through uv where it reaches its index: it downloads in parallel and links from its
# cache, so torch's wheels take seconds instead of pip's two minutes, and a second stack on the same
# torch copies nothing. pip, with its own configuration (a mirror, find-links), where uv cannot.
UV_VERSION=0.13.10
install() {
    if [ -z "${SETUP_NO_UV:-}" ] && { [ -x "$VENV/bin/uv" ] || "${PIP[@]}" install "uv==$UV_VERSION" >/dev/null 2>&1; }; then
        "$VENV/bin/uv" pip install --quiet --python "$PY" -c "$CONSTRAINTS" "$@" && return 0
        say "uv could not install $*; installing with pip"
    fi
    "${PIP[@]}" install -c "$CONSTRAINTS" "$@"
}

# Keeps every later install from replacing torch or lifting setuptools past 81.
CONSTRAINTS="$VENV/hieradet-constraints.txt"
printf 'torch==%s\ntorchvision==%s\n%s\n%s' "$TORCH_VERSION" "$TORCHVISION_VERSION" "$SETUPTOOLS_PIN" "${NUMPY_SPEC:+$NUMPY_SPEC
}" > "$CONSTRAINTS"

have() { "$PY" - "$@" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        ok &= version(name) == want
    except PackageNotFoundError:
        ok = False
sys.exit(0 if ok else 1)
PYEOF
}

if ! have "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" ninja==1.13.0; then
    say "installing torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION (under a minute with uv)"
    install "$SETUPTOOLS_PIN" wheel ninja==1.13.0 \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" ${NUMPY_SPEC:+"$NUMPY_SPEC"}
fi
install "$SETUPTOOLS_PIN"
stage_done "torch"

if ! have "$MMENGINE_DIST==$MMENGINE_VERSION"; then
    say "installing $MMENGINE_DIST $MMENGINE_VERSION"
    install "$MMENGINE_DIST==$MMENGINE_VERSION"
fi

# --- mmcv: built from source with ops, cached by everything its binary depends on ---
# CPU ops, or CUDA ops for the visible GPUs when torch sees one and nvcc is there (tools/mmcv_build.py).
MMCV_CPATH="" MMCV_HIDE_GPU=""
MMCV_PLAN="$("$PY" "$ROOT/tools/mmcv_build.py")"
eval "$MMCV_PLAN"
if [ "$MMCV_OPS" = error ]; then
    say "cannot build mmcv's CUDA ops: $MMCV_NOTE"
    exit 1
fi
[ "$MMCV_OPS" = cpu ] && [ -z "$MMCV_HIDE_GPU" ] || say "mmcv: $MMCV_NOTE"
CUDA_TAG="$MMCV_TAG"
PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PY_TAG-$CUDA_TAG"

# With CUDA ops wanted, an installed mmcv whose ops were compiled without CUDA does not count.
mmcv_ops_work() { "$PY" -c 'import mmcv, mmcv.ops; assert mmcv.__version__ == "'"$MMCV_VERSION"'"
import sys
if sys.argv[1] == "cuda": assert mmcv.ops.get_compiling_cuda_version() != "not available"' "$MMCV_OPS" >/dev/null 2>&1; }

if ! mmcv_ops_work; then
    if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
        mkdir -p "$CACHE/logs" "$CACHE/build"
        LOG="$CACHE/logs/mmcv-$MMCV_VERSION-$PY_TAG-$CUDA_TAG-$(date +%Y%m%d-%H%M%S).log"
        BUILD="$CACHE/build/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PY_TAG-$CUDA_TAG"  # one per stack: builds may overlap
        SRC="$BUILD/mmcv-$MMCV_VERSION"
        if [ "$MMCV_OPS" = cuda ]; then
            say "building mmcv $MMCV_VERSION with CUDA ops ($CUDA_TAG) from source: about $MMCV_BUILD_MINUTES min with ${MAX_JOBS:-$(nproc)} parallel jobs, once per machine"
        else
            say "building mmcv $MMCV_VERSION with ops ($CUDA_TAG) from source: about 6 min on 2 cores (more on older processors), once per machine"
        fi
        say "build log: $LOG"
        rm -rf "$BUILD"
        "${PIP[@]}" download --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD/sdist"
        tar -xzf "$BUILD/sdist/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD"
        # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes c++14/c++17 (mmcv#3341). Older torch builds as released.
        if "$PY" -c 'import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 10))'; then
            sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
        fi
        start=$(date +%s)
        (
            cd "$SRC"
            export MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" PATH="$VENV/bin:$PATH"
            # Python's own flags without -g: with debug info for torch's headers the library is 74 MB
            # instead of 2 MB and slower to compile and link, and no one reads it.
            export CFLAGS="-DNDEBUG -O3 -g0 -fwrapv -Wno-unused-result"
            if [ "$MMCV_OPS" = cpu ]; then  # torch's headers parsed once instead of per source (the wrapper says how)
                export MMCV_REAL_CXX="${CXX:-c++}" CXX="$ROOT/tools/mmcv_pch_cxx.sh" CFLAGS="$CFLAGS -Winvalid-pch"
            fi
            if [ "$MMCV_OPS" = cuda ]; then  # for the GPUs present unless TORCH_CUDA_ARCH_LIST was set
                export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST CUDA_HOME="$MMCV_CUDA_HOME"
                [ -z "$MMCV_CPATH" ] || export CPATH="$MMCV_CPATH${CPATH:+:$CPATH}"
            elif [ -n "$MMCV_HIDE_GPU" ]; then
                export CUDA_VISIBLE_DEVICES=""
            fi
            "$PY" -m pip wheel --no-build-isolation --no-deps -v . -w "$WHEEL_DIR.tmp"
        ) > "$LOG" 2>&1 &
        build_pid=$!
        next_report=$(( start + 60 ))
        while kill -0 "$build_pid" 2>/dev/null; do  # polled often, so that the end is noticed at once
            sleep 2
            if [ "$(date +%s)" -ge "$next_report" ] && kill -0 "$build_pid" 2>/dev/null; then
                say "  still building mmcv ($(( ($(date +%s) - start) / 60 )) min so far; compiled $(grep -o '\[[0-9]*/[0-9]*\]' "$LOG" | tail -n 1 | tr -d '[]' || true))"
                next_report=$(( next_report + 60 ))
            fi
        done
        if ! wait "$build_pid"; then
            say "mmcv build FAILED; see the log: $LOG"
            tail -n 20 "$LOG" >&2
            exit 1
        fi
        rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
        say "mmcv built in $(( ($(date +%s) - start) / 60 )) min; cached in $WHEEL_DIR"
    else
        say "using the cached mmcv wheel from $WHEEL_DIR"
    fi
    install --force-reinstall --no-deps "$WHEEL_DIR"/mmcv-*.whl
    install addict packaging Pillow pyyaml yapf opencv-python
fi
stage_done "mmcv"

if ! have "$MMDET_DIST==$MMDET_VERSION"; then
    say "installing $MMDET_DIST $MMDET_VERSION"
    install "$MMDET_DIST==$MMDET_VERSION"
fi
# Two distributions writing one module (mmengine) leave whichever was installed last: refuse that.
if [ "$MMENGINE_DIST" != mmengine ] && "$PY" -m pip show -q mmengine >/dev/null 2>&1; then
    say "both mmengine and $MMENGINE_DIST are installed in $VENV; remove the venv and run again"
    exit 1
fi
# Where the venv imports this package from; asked from / so that the current directory's copy does not answer.
installed_from() { (cd / && "$PY" -c 'import hieradet_mmdet, os; print(os.path.dirname(os.path.dirname(hieradet_mmdet.__file__)))' 2>/dev/null); }
# This package, editable, with its test extras: pytest (+ pytest-randomly, pytest-xdist), pycocotools, birder
# (the reference the tests compare against), safetensors, onnx + onnxruntime (export tests), hotcoco and
# faster-coco-eval (the fast COCO evaluators, compared with pycocotools).
# birder asks for a newer setuptools; the constraints keep the one mmcv and mmengine need.
# Other stacks: the test extras birder cannot join (tests/compat.py: the compatibility selection).
if [ "$STACK" != current ]; then
    if ! "$PY" -c 'import pytest_randomly, xdist, pycocotools, safetensors' 2>/dev/null; then
        say "installing the compatibility tests' dependencies"
        install pytest pytest-randomly pytest-xdist pycocotools safetensors
    fi
    if [ "$(installed_from)" != "$ROOT" ]; then
        say "installing hieradet-mmdet (editable) from $ROOT"
        install --no-build-isolation --no-deps -e "$ROOT"
    fi
elif ! have "birder==$BIRDER_VERSION" \
        || ! (cd / && "$PY" -c 'import hieradet_mmdet, pytest_randomly, xdist, onnx, onnxscript, onnxruntime, pycocotools, safetensors, hotcoco, faster_coco_eval' 2>/dev/null) \
        || [ "$(installed_from)" != "$ROOT" ]; then
    say "installing hieradet-mmdet (editable) with its test dependencies"
    install --no-build-isolation -e "$ROOT[test]"
fi
stage_done "mmdet and this package"

# panopticapi, which MMDetection's panoptic dataset and PQ metric import: panopticapi-lite is the code of
# cocodataset/panopticapi; its metadata pins numpy<2, which would pull numpy back under torch, so it is
# installed without dependencies (it needs only numpy and Pillow, both here).
if ! have panopticapi-lite==0.2.0; then
    say "installing panopticapi-lite 0.2.0 (without its numpy<2 pin)"
    install --no-deps panopticapi-lite==0.2.0
fi

# Byte-compiled here, as pip does at install and uv does not: where PYTHONDONTWRITEBYTECODE is set (CI
# machines here), every process would otherwise compile each module it imports, torch's included.
# compileall skips what is compiled already; files written for other Pythons fail, as under pip.
"$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
stage_done "byte-compiling"

"$PY" -c "import hieradet_mmdet, mmdet, torch; from mmcv.ops import nms, RoIAlign; print('[setup] ready: torch', torch.__version__, '| mmdet', mmdet.__version__)"
[ "$STACK" = current ] || touch "$VENV/.setup-done"
