"""tools/mmcv_build.py: which mmcv ops tools/setup_env.sh builds, and the cache key it files them
under. The CUDA branch cannot run without a GPU; its decisions can (fake GPUs, fake nvcc)."""

import importlib.util
import stat

import pytest

from helpers import ROOT, fail_text, run_tool

# A tool, not part of the package: tools/setup_env.sh runs it before the package is installed.
_spec = importlib.util.spec_from_file_location("mmcv_build", ROOT / "tools" / "mmcv_build.py")
mmcv_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mmcv_build)


def decide(caps, torch_cuda="13.0", nvcc="/opt/cuda/bin/nvcc", release="13.0", env=None, jobs=16):
    return mmcv_build.decide(caps, torch_cuda, nvcc, release, env or {}, jobs)


def test_without_a_gpu_the_cpu_build_and_cache_key_are_unchanged():
    out = decide([], torch_cuda="13.0")
    assert out["MMCV_OPS"] == "cpu" and out["MMCV_TAG"] == "cpu" and "MMCV_HIDE_GPU" not in out
    assert decide([(9, 0)], torch_cuda=None)["MMCV_TAG"] == "cpu"  # a CPU build of torch
    proc = run_tool(ROOT / "tools" / "mmcv_build.py")  # this machine: no GPU visible (run_tool hides any)
    assert proc.returncode == 0, fail_text(proc)
    assert "MMCV_OPS=cpu\n" in proc.stdout and "MMCV_TAG=cpu\n" in proc.stdout


def test_cuda_ops_for_the_gpus_present():
    h200 = decide([(9, 0)])
    assert h200["MMCV_OPS"] == "cuda" and h200["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert h200["MMCV_TAG"] == "cu130-sm90" and h200["MMCV_CUDA_HOME"] == "/opt/cuda"
    mixed = decide([(9, 0), (8, 0), (9, 0)], torch_cuda="12.8", release="12.9")
    assert mixed["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0" and mixed["MMCV_TAG"] == "cu129-sm80-sm90"
    assert int(mixed["MMCV_BUILD_MINUTES"]) > int(h200["MMCV_BUILD_MINUTES"])  # two architectures


def test_an_arch_list_that_is_set_wins_and_names_the_cache():
    out = decide([(9, 0)], env={"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"})
    assert out["TORCH_CUDA_ARCH_LIST"] == "8.0 9.0+PTX" and out["MMCV_TAG"] == "cu130-sm80-sm90ptx"


def test_force_cuda_builds_cuda_ops_without_a_gpu_for_the_arch_list_given():
    out = decide([], env={"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"})
    assert out["MMCV_OPS"] == "cuda" and out["MMCV_TAG"] == "cu130-sm90"
    assert decide([], env={"FORCE_CUDA": "1"})["MMCV_OPS"] == "error"  # no GPU to read the list from
    assert decide([], nvcc=None, release=None, env={"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"})[
        "MMCV_OPS"] == "error"


def test_a_gpu_without_nvcc_builds_cpu_ops_with_the_gpu_hidden_and_says_so():
    out = decide([(9, 0)], nvcc=None, release=None)
    assert out["MMCV_OPS"] == "cpu" and out["MMCV_TAG"] == "cpu" and out["MMCV_HIDE_GPU"] == "1"
    assert "no CUDA compiler" in out["MMCV_NOTE"] and "13.0" in out["MMCV_NOTE"]


def test_nvcc_of_another_cuda_major_is_refused():
    out = decide([(9, 0)], torch_cuda="13.0", release="12.4")
    assert out["MMCV_OPS"] == "error" and "12.4" in out["MMCV_NOTE"] and "13.0" in out["MMCV_NOTE"]


def test_finds_and_asks_the_compiler(tmp_path):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    assert mmcv_build.nvcc_path({"CUDA_HOME": str(home), "PATH": ""}) == str(nvcc)
    assert mmcv_build.nvcc_version(str(nvcc)) == "13.0"
    assert mmcv_build.cuda_headers_missing(str(home))  # a toolkit with the compiler only
    (home / "include").mkdir()
    (home / "include" / "cusparse.h").write_text("")
    assert not mmcv_build.cuda_headers_missing(str(home))


@pytest.mark.parametrize("script", ["setup_env.sh", "mmcv_pch_cxx.sh", "test_stack.sh"])
def test_shell_scripts_parse(script):
    assert run_tool("bash", "-n", ROOT / "tools" / script).returncode == 0
