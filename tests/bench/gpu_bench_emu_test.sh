#!/usr/bin/env bash
# gpu_bench on the CPU emulator of CUDA (tests/cuda_emu/README.md), at a shape small enough to
# emulate: every mode check.sh runs on a GPU must finish without an error and print what the
# table reads (the figures themselves mean nothing here). The first-step losses of the
# training modes must agree, as check.sh requires on a GPU.
set -euo pipefail
BENCH=$1
SHAPE="--hidden=64 --inter=160 --layers=2 --heads=2 --kv_heads=1 --vocab=256 --tied=1 --batch=1
  --seq=64 --micro_batches=2 --warmup=1 --steps=2"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for mode in kernels memory memory_recompute offload offload_clip sizes; do
  echo "== $mode"
  # shellcheck disable=SC2086
  "$BENCH" --name=tiny --mode=$mode $SHAPE | tee -a "$out"
done
/usr/bin/python3 - "$out" <<'PY'
import json, math, sys
rows = {r["mode"]: r for r in map(json.loads, open(sys.argv[1]))}
errors = []
def need(cond, what):
    if not cond:
        errors.append(what)
for mode in ("memory", "memory_recompute", "offload", "offload_clip"):
    r = rows[mode]
    need("error" not in r and "skipped" not in r, f"{mode}: {r.get('error') or r.get('skipped')}")
    need(r.get("tokens_per_s", 0) > 0, f"{mode}: tokens_per_s")
    # Random weights over 256 tokens: the first loss is near ln(256) = 5.55.
    need(abs(r.get("loss_first", 0) - math.log(256)) < 0.5, f"{mode}: loss_first {r.get('loss_first')}")
    need(0 < r.get("device_peak_bytes", 0) <= r.get("device_budget_bytes", 0),
         f"{mode}: device peak {r.get('device_peak_bytes')} over budget {r.get('device_budget_bytes')}")
for mode in ("offload", "offload_clip"):
    r = rows[mode]
    need(r.get("h2d_bytes_per_step", 0) > 0 and r.get("d2h_bytes_per_step", 0) > 0,
         f"{mode}: bytes moved")
    need(0 < r.get("device_busy_fraction", 0) <= 1, f"{mode}: device_busy_fraction")
need("clipped_steps" in rows["offload_clip"], "offload_clip: clipped_steps")
first = rows["memory"].get("loss_first", 0)
for mode in ("memory_recompute", "offload", "offload_clip"):
    other = rows[mode].get("loss_first", 0)
    need(abs(other - first) <= 0.02 * first, f"{mode}: first loss {other} vs memory {first}")
k = rows["kernels"]
need("error" not in k and len(k.get("kernels", {})) > 0, f"kernels: {k.get('error')}")
need(rows["sizes"].get("min_working_set_bytes", 0) > 0, "sizes: min_working_set_bytes")
if errors:
    print("FAILED:\n  " + "\n  ".join(errors))
    sys.exit(1)
print("gpu_bench ran every mode on the emulator")
PY
