#!/usr/bin/env bash
# FlashAttention-4 (FlexAttention's FLASH backend) on the GPU machine, for bench_kernels.py's flex-flash rows.
# Its wheels (../shared/reference/hopper-anchors.md) add up to ~100 MB, more than one device call carries beside
# this checkout (64 MiB in all with the carried paths; the checkout is ~52 MB since the shipped wan8k models), so
# they travel as one tar stream cut into parts of FA4_PART_MB (default 11) MB, one part per call, to one warm
# machine:
#
#   here:    bash bench/fa4_wheels.sh download        # .fa4b/c00 .. .fa4b/cNN, one part each (+ COUNT in c00)
#   device:  bash bench/fa4_wheels.sh stage           # call N carries .fa4b/cNN: copies its part into /tmp/fa4
#   device:  bash bench/fa4_wheels.sh install         # after the last part: join, check, install into /tmp/fa4site;
#                                                     # prints the PYTHONPATH to export (the .pth file is not read
#                                                     # by pip --target, so dsl_packages is named too)
#
# `bash bench/fa4_wheels.sh parts` lists the folders to carry, one per call. Add .fa4b to .git/info/exclude once.
# /tmp/fa4 lives as long as the machine stays warm (30 s between calls): chain the calls.
set -euo pipefail
cmd="${1:-}"
part_bytes=$(( ${FA4_PART_MB:-11} * 1000000 ))
case "$cmd" in
download)
    mkdir -p .fa4b/dl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d .fa4b/dl flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
        nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
        apache-tvm-ffi torch-c-dlpack-ext
    rm -rf .fa4b/c[0-9]* .fa4b/part*
    (cd .fa4b/dl && sha256sum ./*.whl > SHA256SUMS && tar -cf - SHA256SUMS ./*.whl) | split -b "$part_bytes" -d -a 2 - .fa4b/part
    n=0
    for p in .fa4b/part*; do
        d=.fa4b/c${p#.fa4b/part}
        mkdir -p "$d" && mv "$p" "$d/"
        n=$((n + 1))
    done
    echo "$n" > .fa4b/c00/COUNT
    du -sh .fa4b/c[0-9]*
    ;;
parts)
    ls -d .fa4b/c[0-9]*
    ;;
stage)
    mkdir -p /tmp/fa4
    for d in .fa4b/c[0-9]*; do [ -d "$d" ] && cp "$d"/* /tmp/fa4/; done
    ls /tmp/fa4
    ;;
install)
    cd /tmp/fa4
    [ -f COUNT ] || { echo "missing COUNT: stage .fa4b/c00 first" >&2; exit 2; }
    n=$(cat COUNT)
    for i in $(seq 0 $((n - 1))); do
        p=$(printf "part%02d" "$i")
        [ -f "$p" ] || { echo "missing $p: stage all $n parts first" >&2; exit 2; }
    done
    mkdir -p w && cat $(seq -f "part%02g" 0 $((n - 1))) | tar -xf - -C w
    (cd w && sha256sum -c SHA256SUMS)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4site w/*.whl
    echo "export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:\$PYTHONPATH"
    ;;
*)
    echo "usage: bash bench/fa4_wheels.sh download|parts|stage|install (see the comment at its top)" >&2
    exit 2
    ;;
esac
