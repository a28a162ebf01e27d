#!/usr/bin/env python
"""How to build mmcv's ops here: for CPU, or with CUDA for the GPUs this machine has.

    python tools/mmcv_build.py          # prints shell assignments; tools/setup_env.sh `eval`s them

CUDA ops are built when torch sees a GPU and a CUDA compiler (nvcc) is there, or with
``FORCE_CUDA=1`` (mmcv's switch, for building on a machine without a GPU: then
``TORCH_CUDA_ARCH_LIST`` must be set). ``TORCH_CUDA_ARCH_LIST`` is the visible GPUs' compute
capabilities unless it is set already, and the wheel cache key names the nvcc CUDA version and
those architectures (a wheel built for sm_80 does not run on sm_90). Anything else builds CPU
ops, exactly as on a machine without a GPU.

Printed: MMCV_OPS (cpu | cuda | error), MMCV_TAG (the cache key part: 'cpu' or e.g.
'cu130-sm90'), MMCV_NOTE (why, for the log), MMCV_BUILD_MINUTES (a rough estimate); for CUDA
builds TORCH_CUDA_ARCH_LIST, MMCV_NVCC, MMCV_CUDA_HOME and MMCV_CPATH (torch's pip-installed CUDA
headers, for toolkits that ship the compiler without the cuSPARSE / cuBLAS headers that torch's
headers include); MMCV_HIDE_GPU=1 when a GPU is visible but CPU ops are built.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

# mmcv 2.1.0 with ops: 136 compile jobs (58 of them CUDA). CPU minutes of one x86 core (gcc 12,
# nvcc 13 with torch 2.14's headers): the C++ part, each CUDA architecture on top, and the longest
# single file per architecture (filtered_lrelu.cu, ~3.1 min; most .cu files take 30-50 s), which
# no number of cores shortens. setuptools compiles the sources in sorted order, which starts it
# about a minute and a half into a many-core build.
CPU_BUILD_CORE_MINUTES = 22.0
CUDA_ARCH_CORE_MINUTES = 38.0
LONGEST_FILE_MINUTES = 3.1
LONGEST_FILE_START_MINUTES = 1.5


def nvcc_path(env: Optional[dict] = None) -> Optional[str]:
    """The CUDA compiler torch's extension builder should use: CUDA_HOME's (or CUDA_PATH's), else
    /usr/local/cuda's, else the first on PATH (which may be a wrapper outside its toolkit)."""
    env = os.environ if env is None else env
    for home in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc", path=env.get("PATH"))


def nvcc_version(nvcc: str) -> Optional[str]:
    """'13.0' from ``nvcc --version`` ('Cuda compilation tools, release 13.0, V13.0.88')."""
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def arch_tag(arch_list: str) -> str:
    """'8.0;9.0+PTX' -> 'sm80-sm90ptx' (for a directory name)."""
    parts = [p for p in re.split(r"[;\s,]+", arch_list.strip()) if p]
    return "-".join("sm" + re.sub(r"[^0-9a-z]", "", p.lower()) for p in parts)


def estimate_minutes(arch_count: int, jobs: int) -> int:
    """Wall minutes for the build with ``jobs`` parallel compilers (ignoring link time)."""
    core_minutes = CPU_BUILD_CORE_MINUTES + CUDA_ARCH_CORE_MINUTES * arch_count
    critical = LONGEST_FILE_START_MINUTES + LONGEST_FILE_MINUTES * arch_count if arch_count else 0.0
    return max(1, round(max(core_minutes / max(1, jobs), critical)))


def decide(gpu_capabilities: Sequence[tuple[int, int]], torch_cuda: Optional[str], nvcc: Optional[str],
           nvcc_release: Optional[str], env: dict, jobs: int) -> dict[str, str]:
    """The build plan as variables. ``gpu_capabilities``: the visible GPUs' (major, minor), empty
    without a GPU; ``torch_cuda``: torch.version.cuda; ``nvcc``/``nvcc_release``: the compiler
    found and its CUDA release, or None."""
    cpu = dict(MMCV_OPS="cpu", MMCV_TAG="cpu", MMCV_BUILD_MINUTES=str(estimate_minutes(0, jobs)))
    forced = env.get("FORCE_CUDA") == "1"  # mmcv's own switch: CUDA ops without a GPU here
    if forced and not (torch_cuda and env.get("TORCH_CUDA_ARCH_LIST") and nvcc and nvcc_release):
        return dict(MMCV_OPS="error", MMCV_TAG="", MMCV_NOTE=(
            "FORCE_CUDA=1 needs a CUDA build of torch, TORCH_CUDA_ARCH_LIST (no GPU to read it from) and nvcc; "
            f"found torch CUDA {torch_cuda}, TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')!r}, nvcc {nvcc}"))
    if (not gpu_capabilities and not forced) or not torch_cuda:
        return dict(cpu, MMCV_NOTE="no GPU visible to torch: CPU ops")
    if nvcc is None or nvcc_release is None:
        # mmcv's setup.py compiles CUDA code whenever torch sees a GPU: hide it from that build.
        return dict(cpu, MMCV_HIDE_GPU="1", MMCV_NOTE=(f"a GPU is visible but no CUDA compiler (nvcc) was found: CPU ops only, "
                                    f"which cannot run detectors on the GPU. Install the CUDA {torch_cuda} toolkit "
                                    "(or set CUDA_HOME) and run the setup again to build the CUDA ops."))
    if nvcc_release.split(".")[0] != torch_cuda.split(".")[0]:
        return dict(MMCV_OPS="error", MMCV_TAG="", MMCV_NOTE=(
            f"nvcc ({nvcc}) is CUDA {nvcc_release}, but torch was built with CUDA {torch_cuda}; torch refuses to "
            f"build extensions across major versions. Point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]}.x toolkit."))
    arch_list = env.get("TORCH_CUDA_ARCH_LIST") or ";".join(
        sorted({f"{major}.{minor}" for major, minor in gpu_capabilities}))
    arches = [p for p in re.split(r"[;\s,]+", arch_list.strip()) if p]
    return dict(MMCV_OPS="cuda", MMCV_TAG=f"cu{nvcc_release.replace('.', '')}-{arch_tag(arch_list)}",
                TORCH_CUDA_ARCH_LIST=arch_list, MMCV_NVCC=nvcc, MMCV_CUDA_HOME=str(Path(nvcc).parents[1]),
                MMCV_BUILD_MINUTES=str(estimate_minutes(len(arches), jobs)),
                MMCV_NOTE=f"CUDA ops for {arch_list} with nvcc {nvcc_release} (torch CUDA {torch_cuda})")


def torch_cuda_headers() -> list[str]:
    """Include folders of the CUDA libraries pip installed with torch (nvidia/*/include) that hold
    the headers torch's own CUDA headers need."""
    found = []
    for entry in sys.path:
        base = Path(entry or ".", "nvidia")
        if base.is_dir():
            found += [str(p.parent) for p in sorted(base.glob("*/include/cusparse.h"))]
    return list(dict.fromkeys(found))


def cuda_headers_missing(cuda_home: str) -> bool:
    """Whether the toolkit lacks the cuSPARSE header that ATen/cuda/CUDAContext.h includes."""
    return not Path(cuda_home, "include", "cusparse.h").exists()


def plan(env: Optional[dict] = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    jobs = int(env.get("MAX_JOBS") or os.cpu_count() or 1)
    try:
        import torch
    except ImportError:
        return dict(MMCV_OPS="cpu", MMCV_TAG="cpu", MMCV_NOTE="torch is not installed", MMCV_BUILD_MINUTES="?")
    capabilities = ([torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
                    if torch.cuda.is_available() else [])
    nvcc = nvcc_path(env) if capabilities or env.get("FORCE_CUDA") == "1" else None
    out = decide(capabilities, torch.version.cuda, nvcc, nvcc_version(nvcc) if nvcc else None, env, jobs)
    if out["MMCV_OPS"] == "cuda" and cuda_headers_missing(out["MMCV_CUDA_HOME"]):
        out["MMCV_CPATH"] = ":".join(torch_cuda_headers())
    return out


def main() -> int:
    for key, value in plan().items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
