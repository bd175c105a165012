#!/usr/bin/env bash
# FlashAttention-4 (FlexAttention's FLASH backend) on the GPU machine, for bench_kernels.py's flex-flash rows.
# Its wheels (../shared/reference/hopper-anchors.md) add up to ~100 MB, more than one device call carries beside
# this checkout (64 MiB in all, the checkout ~36 MB), so they travel in four parts, one per call, to one warm machine:
#
#   here:    bash bench/fa4_wheels.sh download        # .fa4b/c1 .. .fa4b/c4 (each < 29 MB) and .fa4b/c4/SHA256SUMS
#   device:  bash bench/fa4_wheels.sh stage           # call N carries .fa4b/cN: copies its files into /tmp/fa4
#   device:  bash bench/fa4_wheels.sh install         # after the fourth: join, check, install into /tmp/fa4site;
#                                                     # prints the PYTHONPATH to export (the .pth file is not read
#                                                     # by pip --target, so dsl_packages is named too)
#
# Add .fa4b to .git/info/exclude once. /tmp/fa4 lives as long as the machine stays warm (30 s between calls).
set -euo pipefail
cmd="${1:-}"
case "$cmd" in
download)
    mkdir -p .fa4b/dl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d .fa4b/dl flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
        nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
        apache-tvm-ffi torch-c-dlpack-ext
    rm -rf .fa4b/c1 .fa4b/c2 .fa4b/c3 .fa4b/c4 && mkdir -p .fa4b/c1 .fa4b/c2 .fa4b/c3 .fa4b/c4
    big=$(ls .fa4b/dl/nvidia_cutlass_dsl_libs_cu13-*.whl)
    (cd .fa4b/dl && sha256sum ./*.whl) > .fa4b/c4/SHA256SUMS
    split -b 28000000 -d -a 1 "$big" .fa4b/part
    mv .fa4b/part0 .fa4b/c1/ && mv .fa4b/part1 .fa4b/c2/ && mv .fa4b/part2 .fa4b/c3/ && mv .fa4b/part3 .fa4b/c4/
    find .fa4b/dl -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec cp {} .fa4b/c4/ \;
    basename "$big" > .fa4b/c4/BIG
    du -sh .fa4b/c1 .fa4b/c2 .fa4b/c3 .fa4b/c4
    ;;
stage)
    mkdir -p /tmp/fa4
    for d in .fa4b/c1 .fa4b/c2 .fa4b/c3 .fa4b/c4; do [ -d "$d" ] && cp "$d"/* /tmp/fa4/; done
    ls /tmp/fa4
    ;;
install)
    cd /tmp/fa4
    for p in part0 part1 part2 part3; do
        [ -f "$p" ] || { echo "missing $p: stage all four parts first" >&2; exit 2; }
    done
    cat part0 part1 part2 part3 > "$(cat BIG)"
    sha256sum -c SHA256SUMS
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4site ./*.whl
    echo "export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:\$PYTHONPATH"
    ;;
*)
    echo "usage: bash bench/fa4_wheels.sh download|stage|install (see the comment at its top)" >&2
    exit 2
    ;;
esac
