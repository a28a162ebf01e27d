#!/usr/bin/env bash
# The C++ compiler for mmcv's CPU-ops build (tools/setup_env.sh sets CXX to it).
# 63 of mmcv 2.1.0's 77 sources open with its pytorch_cpp_helper.hpp, that is with torch's ATen headers,
# whose parsing is most of each source's compile time (17 of 21 s with torch 2.15's headers). The first
# compile precompiles that header once, with the build's own flags, next to it; every compile after that
# finds the .gch there. GCC uses a .gch only when it was made with the same flags and otherwise reads the
# header as before (-Winvalid-pch makes it say so in the build log), so the objects are the same either way.
# Anything that is not a compile of a .cpp file (version queries, the link) goes to the compiler untouched.
set -uo pipefail
cxx="${MMCV_REAL_CXX:-c++}"

header="" compiles=0 pch_args=() skip_next=0
for arg in "$@"; do
    if [ "$skip_next" = 1 ]; then skip_next=0; continue; fi
    case "$arg" in
        -o | -MF) skip_next=1 ;;             # the object and its dependency file
        -c | -MMD) [ "$arg" = -c ] && compiles=1 ;;
        *.cpp) ;;                            # the source
        -I*)
            pch_args+=("$arg")
            dir="${arg#-I}"
            [ -z "$header" ] && [ -f "$dir/pytorch_cpp_helper.hpp" ] && header="$dir/pytorch_cpp_helper.hpp"
            ;;
        *) pch_args+=("$arg") ;;
    esac
done

if [ "$compiles" = 1 ] && [ -n "$header" ]; then
    (
        flock 9
        if [ ! -e "$header.gch" ] && [ ! -e "$header.gch.failed" ]; then
            if "$cxx" "${pch_args[@]}" -x c++-header "$header" -o "$header.gch.tmp"; then
                mv "$header.gch.tmp" "$header.gch"
            else  # compile without it: slower, same result
                echo "mmcv_pch_cxx: precompiling $header failed; compiling without it" >&2
                rm -f "$header.gch.tmp"; touch "$header.gch.failed"
            fi
        fi
    ) 9> "$header.lock"
fi
exec "$cxx" "$@"
