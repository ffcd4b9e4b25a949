#!/usr/bin/env bash
# tests/gpu/check.sh --build compiles the GPU tests and the benchmark without Bazel, from its
# own list of sources; nothing else builds that list, so a source the CUDA code starts to need
# breaks it silently until a GPU session finds out. This builds it from the tree (the runfiles
# hold exactly the sources the filegroups name), checks what it wrote, and runs --run on it.
set -euo pipefail
export TMPDIR=${TEST_TMPDIR:-$(mktemp -d)}
OUT=$TMPDIR/gpu-check
JOBS=2 bash tests/gpu/check.sh --build "$OUT" > "$TMPDIR/build.log" 2>&1 || {
  tail -n 40 "$TMPDIR/build.log"; echo "FAIL: check.sh --build"; exit 1; }
tail -n 3 "$TMPDIR/build.log"
for f in kernels_test training_test gpu_bench check.sh gpu_bench_torch.py; do
  [ -e "$OUT/$f" ] || { echo "FAIL: check.sh --build wrote no $f"; exit 1; }
done
mib=$(du -sm "$OUT" | cut -f1)
echo "build/gpu-check: $mib MiB"
# 64 MiB travel to the GPU machine with the source tree.
[ "$mib" -le 40 ] || { echo "FAIL: $mib MiB is too much to carry"; exit 1; }
# The binaries must start with only what travels and the toolkit's libraries.
bash "$OUT/check.sh" --run "$OUT" > "$TMPDIR/run.log" 2>&1 || {
  tail -n 40 "$TMPDIR/run.log"; echo "FAIL: check.sh --run"; exit 1; }
tail -n 20 "$TMPDIR/run.log"
grep -q "check.sh --run: exit 0" "$TMPDIR/run.log" || { echo "FAIL: no exit line"; exit 1; }
if ! command -v nvidia-smi > /dev/null; then
  # No GPU here: each test binary ran and said why it skipped.
  for t in kernels_test training_test; do
    grep -q "^SKIPPED: no GPU" "$OUT/results/$t.log" || {
      cat "$OUT/results/$t.log"; echo "FAIL: $t did not report the skip"; exit 1; }
  done
fi
echo "PASS"
