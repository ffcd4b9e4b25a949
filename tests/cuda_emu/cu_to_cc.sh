#!/bin/sh
# cu_to_cc.sh IN.cu OUT.cc: rewrites a CUDA source into C++ for the CPU emulator
# (tests/cuda_emu/README.md). A launch `kernel<T><<<grid, block, smem, stream>>>(args)` becomes
# `::cuda_emu::Launch("kernel<T>", kernel<T>, grid, block, smem, stream)(args)`; a dynamic
# shared-memory array becomes a pointer to the block's dynamic shared memory; <mma.h> gives way
# to kernel_shim.h's wmma (the build force-includes kernel_shim.h). Nothing else changes, so
# the emulator runs the kernels as written.
set -eu
sed -E \
  -e 's/([A-Za-z_][A-Za-z0-9_:]*(<[^<>;()]*>)?)<<</::cuda_emu::Launch("\1", \1, /g' \
  -e 's/>>>\(/)(/g' \
  -e 's/extern __shared__ __align__\([0-9]+\) unsigned char ([A-Za-z_][A-Za-z0-9_]*)\[\];/unsigned char* \1 = ::cuda_emu::DynamicShared();/' \
  -e 's|^#include <mma.h>|// <mma.h>: kernel_shim.h emulates nvcuda::wmma|' \
  "$1" > "$2"
if grep -n '<<<\|>>>\|extern __shared__' "$2" >&2; then
  echo "cu_to_cc.sh: $1 has a construct it does not rewrite (above)" >&2
  exit 1
fi
