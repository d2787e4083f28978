#!/usr/bin/env bash
# Download, here (with internet), the wheels that a GPU image without internet lacks, for its
# Python and platform (default: CPython 3.12, manylinux x86_64), into DIR (default .gpu_wheels,
# ignored by git). Then carry DIR to the GPU machine; run_gpu.sh / gpu_check.sh install from it.
#
#   bash benchmarks/fetch_gpu_wheels.sh [DIR] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu_wheels}
py=${2:-3.12}
abi=cp${py/./}
packages=$(grep -v '^\s*#' benchmarks/gpu_wheels.txt | awk 'NF == 2 {print $2}')
mkdir -p "$dir"
# --no-deps: the list is closed (numpy, the one dependency of pycocotools, is on every torch image)
pip download --quiet --only-binary=:all: --no-deps --python-version "$py" --implementation cp --abi "$abi" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dir" $packages
echo "wheels for CPython $py in $dir ($(du -sh "$dir" | cut -f1)):"
ls "$dir"
