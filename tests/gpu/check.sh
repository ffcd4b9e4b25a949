#!/usr/bin/env bash
# The GPU check of the CUDA device (docs/gpu.md), in two halves:
#   tests/gpu/check.sh --build [DIR]   on a build machine with nvcc (no GPU needed): compiles the
#       GPU tests and the benchmark without Bazel and writes DIR (default build/gpu-check/):
#       binaries, any shared library they need that a bare GPU machine lacks (none today: Abseil,
#       gtest, libstdc++ and libgcc are linked statically; glibc >= 2.34 is assumed), this
#       script and gpu_bench_torch.py. Well under 64 MiB; no OpenBLAS (a small cblas stand-in
#       serves the CPU reference).
#   DIR/check.sh --run                  on the GPU machine (CUDA 13 driver and toolkit libraries,
#       python3 with PyTorch): runs the kernel and training tests, then the benchmark and the
#       PyTorch reference per model shape, and ends with a table. Each part has a timeout; the
#       whole has not run on a GPU yet (estimated at 5-6 minutes on one H100). Without a GPU
#       every part reports "skipped" and the script exits 0.
# --run exits 1 when a test fails, a benchmark errors or the modes' losses disagree (MISMATCH);
# missed performance targets are shown as MISS in the table (and make --run --strict exit 3).
# Without python3 it prints the raw results and exits 0.
set -uo pipefail

usage() { echo "usage: $0 --build [DIR] | --run [--strict] [DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
MODE=$1; shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

build() {
  set -e
  local ROOT; ROOT=$(cd "$HERE/../.." && pwd)
  local OUT=${1:-$ROOT/build/gpu-check}
  local CUDA=${CUDA_PATH:-/usr/local/cuda}
  local NVCC=$CUDA/bin/nvcc
  [ -x "$NVCC" ] || { echo "no nvcc at $NVCC" >&2; exit 1; }
  local JOBS=${JOBS:-2}
  rm -rf "$OUT"; mkdir -p "$OUT/lib" "$OUT/obj"
  local OBJ=$OUT/obj
  local GENCODE="-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_89,code=sm_89 -gencode=arch=compute_90,code=[sm_90,compute_90]"
  local CXXFLAGS="-std=c++17 -O2 -march=x86-64-v2 -fPIC -Wall -Wno-sign-compare -I$HERE/cblas_shim -I$ROOT -I$CUDA/include"
  local t0=$SECONDS
  echo "== nvcc (sm_80, sm_89, sm_90)"
  for f in kernels attention attention_tc; do
    "$NVCC" -std=c++17 -O3 -Xcompiler=-fPIC $GENCODE -I"$ROOT" -c "$ROOT/worker/cuda/$f.cu" \
      -o "$OBJ/$f.cu.o" &
  done
  wait
  echo "   nvcc took $((SECONDS - t0)) s"
  echo "== g++"
  # The library's sources (every object but the three mains links into each binary), then the
  # mains. One list: a source the CUDA code starts to need goes here once.
  local LIB_SRCS="worker/cuda/device.cc worker/cuda/gemm.cc worker/cuda/model.cc worker/cuda/trainer.cc
    worker/cuda/layout.cc worker/cuda/host_state.cc worker/cuda/offload_trainer.cc
    worker/cuda/job_trainer.cc worker/cuda/measure.cc worker/cuda_jobs.cc
    worker/engine/offload_trainer.cc worker/engine/tensor_home.cc worker/engine/transfers.cc
    worker/engine/collective.cc worker/engine/model.cc worker/engine/optimizer.cc
    worker/engine/thread_pool.cc worker/engine/trainer.cc worker/engine/data.cc
    worker/engine/checkpoint.cc worker/engine/safetensors.cc common/json.cc common/cpus.cc
    common/host_memory.cc tests/gpu/cblas_shim/cblas_shim.cc tests/gpu/glibc_compat.cc"
  local TEST_SRCS="tests/gpu/gpu_test_util.cc tests/gpu/gpu_test_main.cc"
  local MAIN_SRCS="worker/cuda/kernels_test.cc tests/gpu/training_test.cc tests/bench/gpu_bench.cc"
  local SRCS="$LIB_SRCS $TEST_SRCS $MAIN_SRCS"
  obj() { local f; for f in "$@"; do printf '%s ' "$OBJ/$(echo "$f" | tr / _).o"; done; }
  printf '%s\n' $SRCS | xargs -P "$JOBS" -I{} sh -c \
    'o="$0/$(echo {} | tr / _).o"; g++ $1 -c "$2/{}" -o "$o" || exit 255' "$OBJ" "$CXXFLAGS" "$ROOT"
  # Abseil's static archives: nothing to ship, and no dependency on Debian's libstdc++.so.
  local ABSL="-Wl,--start-group -Wl,-Bstatic -labsl_status -labsl_statusor -labsl_cord -labsl_cordz_info -labsl_cord_internal
    -labsl_cordz_functions -labsl_cordz_handle -labsl_str_format_internal -labsl_strings
    -labsl_strings_internal -labsl_synchronization -labsl_graphcycles_internal -labsl_time
    -labsl_civil_time -labsl_time_zone -labsl_int128 -labsl_hash -labsl_city
    -labsl_low_level_hash -labsl_raw_hash_set -labsl_stacktrace -labsl_symbolize
    -labsl_debugging_internal -labsl_demangle_internal -labsl_malloc_internal
    -labsl_throw_delegate -labsl_raw_logging_internal -labsl_log_severity -labsl_spinlock_wait
    -labsl_base -labsl_strerror -labsl_exponential_biased -Wl,-Bdynamic -Wl,--end-group"
  local LIB; LIB="$OBJ/kernels.cu.o $OBJ/attention.cu.o $OBJ/attention_tc.cu.o $(obj $LIB_SRCS)"
  local LDFLAGS="-static-libstdc++ -static-libgcc -Wl,-rpath,\$ORIGIN/lib:$CUDA/lib64:/usr/local/cuda/lib64
    -L$CUDA/lib64 $ABSL -lcublasLt -lcublas $CUDA/lib64/libcudart_static.a -ldl -lpthread -lrt"
  local TESTLIB; TESTLIB="$(obj $TEST_SRCS) /usr/lib/x86_64-linux-gnu/libgtest.a"
  g++ -o "$OUT/kernels_test" $OBJ/worker_cuda_kernels_test.cc.o $TESTLIB $LIB $LDFLAGS &
  g++ -o "$OUT/training_test" $OBJ/tests_gpu_training_test.cc.o $TESTLIB $LIB $LDFLAGS &
  g++ -o "$OUT/gpu_bench" $OBJ/tests_bench_gpu_bench.cc.o $LIB $LDFLAGS &
  wait
  for b in kernels_test training_test gpu_bench; do [ -x "$OUT/$b" ] || { echo "link of $b failed" >&2; exit 1; }; done
  rm -rf "$OBJ"
  echo "== shared libraries (copied: everything but glibc and the CUDA toolkit's)"
  for b in kernels_test training_test gpu_bench; do ldd "$OUT/$b"; done | awk '/=> \//{print $3}' | sort -u |
    while read -r lib; do
      case "$(basename "$lib")" in
        libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libgcc_s.so*|libcublas*|libcudart*|libcuda.so*) ;;
        *) cp -L "$lib" "$OUT/lib/" ;;
      esac
    done
  cp "$HERE/check.sh" "$OUT/check.sh"
  cp "$ROOT/tests/bench/gpu_bench_torch.py" "$OUT/"
  local glibc
  glibc=$(shopt -s nullglob
          for f in "$OUT"/kernels_test "$OUT"/training_test "$OUT"/gpu_bench "$OUT"/lib/*; do
            objdump -T "$f" 2>/dev/null || true; done | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
  echo "   needs $glibc or newer; libcublas.so.13 / libcublasLt.so.13 from the GPU machine's toolkit"
  ls -la "$OUT" "$OUT/lib"
  echo "== $OUT: $(du -sh "$OUT" | cut -f1) in total; build took $((SECONDS - t0)) s"
}

run() {
  local STRICT=0
  if [ "${1:-}" = "--strict" ]; then STRICT=1; shift; fi
  local DIR=${1:-$HERE}
  [ -x "$DIR/kernels_test" ] || DIR=$(cd "$HERE/../.." && pwd)/build/gpu-check
  [ -x "$DIR/kernels_test" ] || { echo "no binaries in $DIR: run --build first" >&2; exit 2; }
  cd "$DIR" || exit 2
  local CUDA_LIBS=""
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13 /usr/local/cuda-13.0; do
    [ -n "$d" ] && [ -d "$d/lib64" ] && CUDA_LIBS="$CUDA_LIBS:$d/lib64"
  done
  export LD_LIBRARY_PATH="$DIR/lib$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local RES=$DIR/results; rm -rf "$RES"; mkdir -p "$RES"
  local t0=$SECONDS
  { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"; } | tee "$RES/gpu.txt"
  # Tests.
  for t in kernels_test training_test; do
    local limit=150; [ "$t" = training_test ] && limit=240
    echo "== $t"
    timeout "$limit" "./$t" > "$RES/$t.log" 2>&1; echo $? > "$RES/$t.rc"
    tail -n 25 "$RES/$t.log"
  done
  # Benchmarks: each shape's kernels and three training modes (and offload_clip for the first),
  # then PyTorch on the same shape.
  local -a SHAPES=(
    "1b --hidden=2048 --inter=8192 --layers=16 --heads=32 --kv_heads=8 --vocab=128256 --tied=1 --batch=1 --seq=2048 --micro_batches=16"
    "llama3-8b-L8 --hidden=4096 --inter=14336 --layers=8 --heads=32 --kv_heads=8 --vocab=128256 --tied=0 --batch=1 --seq=2048 --micro_batches=16"
  )
  : > "$RES/bench.jsonl"
  local skip_bench=0
  grep -q '^SKIPPED: no GPU' "$RES/kernels_test.log" && skip_bench=1
  for s in "${SHAPES[@]}"; do
    local name=${s%% *} args=${s#* }
    # The first shape also runs offloaded as a clipping job does (offload_clip).
    local modes="kernels memory memory_recompute offload"
    [ "$s" = "${SHAPES[0]}" ] && modes="$modes offload_clip"
    for mode in $modes; do
      echo "== gpu_bench $name $mode"
      if [ $skip_bench = 1 ]; then
        echo "{\"name\":\"$name\",\"impl\":\"lumen\",\"mode\":\"$mode\",\"skipped\":\"no GPU\"}" | tee -a "$RES/bench.jsonl"
        continue
      fi
      timeout 150 ./gpu_bench --name="$name" --mode="$mode" --warmup=1 --steps=2 $args 2>"$RES/bench_${name}_$mode.err" |
        tee -a "$RES/bench.jsonl"
      local brc=${PIPESTATUS[0]}
      [ "$brc" = 0 ] || { echo "{\"name\":\"$name\",\"impl\":\"lumen\",\"mode\":\"$mode\",\"error\":\"exit $brc (see results/bench_${name}_$mode.err)\"}" >> "$RES/bench.jsonl"; tail -5 "$RES/bench_${name}_$mode.err"; }
    done
    echo "== gpu_bench_torch $name"
    local targs; targs=$(echo "$args" | sed 's/--kv_heads=/--kv-heads=/; s/--micro_batches=/--micro-batches=/')
    if [ $skip_bench = 1 ]; then
      echo "{\"name\":\"$name\",\"impl\":\"pytorch\",\"skipped\":\"no GPU\"}" | tee -a "$RES/bench.jsonl"
    elif ! command -v python3 >/dev/null; then
      echo "{\"name\":\"$name\",\"impl\":\"pytorch\",\"error\":\"no python3\"}" | tee -a "$RES/bench.jsonl"
    else
      timeout 200 python3 gpu_bench_torch.py --name="$name" --warmup=1 --steps=2 $targs 2>"$RES/torch_$name.err" |
        tail -1 | tee -a "$RES/bench.jsonl"
      grep -q "\"name\": \"$name\"" "$RES/bench.jsonl" || { echo "{\"name\":\"$name\",\"impl\":\"pytorch\",\"error\":\"failed (see results/torch_$name.err)\"}" >> "$RES/bench.jsonl"; tail -5 "$RES/torch_$name.err"; }
    fi
  done
  echo "== summary ($((SECONDS - t0)) s)"
  local py=python3; command -v python3 >/dev/null || py=""
  if [ -z "$py" ]; then cat "$RES/bench.jsonl"; fi
  RES="$RES" STRICT=$STRICT ${py:-false} - <<'PY'
import json, os
res = os.environ["RES"]
def rc(t):
    try:
        return int(open(f"{res}/{t}.rc").read())
    except Exception:
        return -1
rows, fail, miss = [], False, False
for t in ["kernels_test", "training_test"]:
    log = open(f"{res}/{t}.log", errors="replace").read()
    code = rc(t)
    if "SKIPPED: no GPU" in log:
        status = "skipped (no GPU)"
    elif code == 0:
        status = "PASS"
    else:
        status = f"FAIL (exit {code})"; fail = True
    rows.append((t, status))
bench = [json.loads(l) for l in open(f"{res}/bench.jsonl") if l.strip().startswith("{")]
summary = {"tests": dict(rows), "runs": bench, "comparisons": []}
names = []
for b in bench:
    if b["name"] not in names:
        names.append(b["name"])
def get(name, impl, mode=None):
    for b in bench:
        if b["name"] == name and b.get("impl") == impl and (mode is None or b.get("mode") == mode):
            return b
    return {}
for name in names:
    mem, rec, off, offc = (get(name, "lumen", m) for m in ("memory", "memory_recompute", "offload", "offload_clip"))
    pt = get(name, "pytorch")
    kr = get(name, "lumen", "kernels")
    for label, b in (("lumen kernels", kr), ("lumen memory", mem), ("lumen memory_recompute", rec), ("lumen offload", off), ("lumen offload_clip", offc), ("pytorch", pt)):
        if label == "lumen kernels" and b and "error" not in b and "skipped" not in b:
            continue  # shown as the attention row below
        if label == "lumen offload_clip" and not b:
            continue  # run for the first shape only
        if "skipped" in b:
            rows.append((f"{name} {label}", "skipped (no GPU)"))
        elif "error" in b or not b:
            rows.append((f"{name} {label}", "ERROR " + b.get("error", "missing")[:80])); fail = True
        else:
            extra = ""
            if label.endswith("offload_clip") and "clipped_steps" in b:
                extra = f", {b['clipped_steps']} of the timed steps clipped (updates redone)"
                if off.get("tokens_per_s"):
                    extra += f", {b['tokens_per_s'] / off['tokens_per_s']:.3f}x the unclipped offload"
            if label.endswith("offload"):
                extra = f" x{b['oversubscription']:.1f} oversubscribed"
                if "oversubscription_params_optimizer" in b:
                    extra += f" (x{b['oversubscription_params_optimizer']:.1f} without activations)"
                if "device_busy_fraction" in b:
                    extra += f", device busy {b['device_busy_fraction']:.0%}"
                if "host_wait_optimizer_layers_s" in b:
                    extra += (f", host waited {b['host_wait_optimizer_layers_s']:.3f} s (layers) + "
                              f"{b['host_wait_optimizer_embed_head_s']:.3f} s (embedding/head) a step for AdamW")
            mfu = b.get("mfu")
            rows.append((f"{name} {label}", f"{b['tokens_per_s']:.0f} tok/s, MFU {mfu:.3f}{extra}" if mfu is not None else f"{b['tokens_per_s']:.0f} tok/s{extra}"))
    c = {"name": name}
    if mem.get("mfu") and pt.get("mfu"):
        c["mfu_ratio_vs_pytorch"] = mem["mfu"] / pt["mfu"]
        c["target_mfu_ratio"] = 0.9
        ok = c["mfu_ratio_vs_pytorch"] >= 0.9
        rows.append((f"{name} MFU / PyTorch's", f"{c['mfu_ratio_vs_pytorch']:.3f} (target >= 0.9) {'met' if ok else 'MISS'}"))
        miss |= not ok
    if off.get("tokens_per_s") and rec.get("tokens_per_s") and mem.get("tokens_per_s"):
        c["offload_vs_memory_recompute"] = off["tokens_per_s"] / rec["tokens_per_s"]
        c["offload_vs_memory"] = off["tokens_per_s"] / mem["tokens_per_s"]
        c["oversubscription"] = off["oversubscription"]
        c["target_offload_ratio"] = 0.85
        c["target_oversubscription"] = 10.0
        ok = c["offload_vs_memory_recompute"] >= 0.85 and off["oversubscription"] >= 10
        rows.append((f"{name} offload / in-memory", f"{c['offload_vs_memory_recompute']:.3f} vs same schedule, {c['offload_vs_memory']:.3f} vs kept activations, at x{off['oversubscription']:.1f} (target >= 0.85 at >= x10) {'met' if ok else 'MISS'}"))
        miss |= not ok
    # The same weights and tokens in every mode: the losses must agree (the schedules differ,
    # the math must not) and fall (the targets are a function of the inputs).
    if rec.get("loss_first"):
        for label, b in (("memory", mem), ("offload", off), ("offload_clip", offc)):
            if not b.get("loss_first"):
                continue
            d1 = abs(b["loss_first"] - rec["loss_first"]) / rec["loss_first"]
            d2 = abs(b["loss"] - rec["loss"]) / rec["loss"]
            fell = (rec["loss_first"] - rec["loss"]) / rec["loss_first"]
            # Clipped, only the first step (before any update) is the same computation.
            ok = d1 <= 1e-3 and (d2 <= 1e-2 or label == "offload_clip")
            c[f"loss_rel_diff_{label}_vs_memory_recompute"] = [d1, d2]
            limits = "limit 1e-3 on the first step" if label == "offload_clip" else "limits 1e-3, 1e-2"
            rows.append((f"{name} {label} loss vs memory_recompute",
                         f"first step {d1:.1e}, last {d2:.1e} apart ({limits}); "
                         f"loss {rec['loss_first']:.4f} -> {rec['loss']:.4f} ({fell:.1%} lower) "
                         f"{'ok' if ok else 'MISMATCH'}"))
            fail |= not ok
    kern = get(name, "lumen", "kernels").get("kernels", {})
    att = [f"{k.replace('attention_', '')} {v['ms']:.2f} ms" for k, v in kern.items() if k.startswith("attention")]
    if att:
        rows.append((f"{name} attention (one micro-batch)", ", ".join(att)))
    summary["comparisons"].append(c)
print(json.dumps(summary))
w = max(len(r[0]) for r in rows)
print("-" * (w + 50))
for k, v in rows:
    print(f"{k:<{w}}  {v}")
print("-" * (w + 50))
if fail:
    raise SystemExit(1)
if miss and os.environ.get("STRICT") == "1":
    raise SystemExit(3)
PY
  local rcode=$?
  [ -z "$py" ] && rcode=0
  echo "check.sh --run: exit $rcode"
  exit $rcode
}

case "$MODE" in
  --build) build "$@" ;;
  --run) run "$@" ;;
  *) usage ;;
esac
