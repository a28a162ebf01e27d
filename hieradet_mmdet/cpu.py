"""Which instructions this process's CPU kernels use: ATen's vector kernels and oneDNN's.

Both can be capped below what the processor has, to test on one machine what another runs:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` makes any x86 CPU an AVX2-only one (no
AVX-512, no AMX, so no native bf16). ``python -m hieradet_mmdet.cpu [--expect avx2]`` prints what
is in effect and, with ``--expect``, fails unless both caps took effect.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import tempfile

import torch

# oneDNN names the ISA in words ("Intel AVX2", "Intel AVX-512 with ... Intel AMX ..."); these
# are the words that mean more than AVX2.
_BEYOND_AVX2 = ("AVX-512", "AVX512", "AMX", "AVX2 with Intel DL Boost", "AVX_VNNI", "AVX-VNNI")


def aten_capability() -> str:
    """'AVX2', 'AVX512', 'DEFAULT', ... : the vector kernels ATen dispatches to."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def onednn_isa() -> str:
    """The instruction set oneDNN reports for this process (after ONEDNN_MAX_CPU_ISA), e.g.
    'Intel AVX2'; '' if oneDNN is not available or said nothing. oneDNN prints it once per
    process, the first time its verbose mode is on: call this before anything else turns it on."""
    if not torch.backends.mkldnn.is_available():
        return ""
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with tempfile.TemporaryFile(mode="w+") as capture:
        sys.stdout.flush()
        saved = os.dup(1)  # oneDNN writes to the C-level stdout
        os.dup2(capture.fileno(), 1)
        try:
            with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        except Exception:  # noqa: BLE001 - no fused linear in this build: no ISA line either
            pass
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        text = capture.read()
    match = re.search(r"^onednn_verbose,(?:v\d+,)?info,cpu,isa:(.*)$", text, re.M)
    return match.group(1).strip() if match else ""


def is_avx2_only(capability: str, isa: str) -> bool:
    return capability == "AVX2" and "AVX2" in isa and not any(word in isa for word in _BEYOND_AVX2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", choices=["avx2"], help="fail unless ATen and oneDNN are both capped at this")
    args = parser.parse_args(argv)
    capability, isa = aten_capability(), onednn_isa()
    print(f"ATen CPU capability: {capability} (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')})")
    print(f"oneDNN ISA: {isa or 'not reported'} (ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')})")
    if args.expect == "avx2" and not is_avx2_only(capability, isa):
        print("error: this process does not run as an AVX2-only CPU; set ATEN_CPU_CAPABILITY=avx2 and "
              "ONEDNN_MAX_CPU_ISA=AVX2 before Python starts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
