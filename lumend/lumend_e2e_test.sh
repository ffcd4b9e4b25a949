#!/bin/bash
# End-to-end test of the lumend binary with shell scripts standing in for memstore, worker and
# coordinator: serving line, node.json, lock refusal, restart, SIGTERM within 10 s.
set -euo pipefail

LUMEND="$1"
WORKER="${2:-}"  # the real worker_cuda, for --device cuda's probe; empty in builds without CUDA
T="$TEST_TMPDIR/e2e"
D="$T/data"
rm -rf "$T"
mkdir -p "$T/bin"

fail() { echo "FAIL: $*" >&2; exit 1; }

# Fake children create their --socket and sleep; the worker ignores SIGTERM so lumend has to
# SIGKILL it after the grace period.
for name in memstore worker coordinator; do
  {
    echo '#!/bin/sh'
    [ "$name" = worker ] && echo "trap '' TERM"
    echo 'while [ $# -gt 0 ]; do [ "$1" = --socket ] && touch "$2"; shift; done'
    echo 'exec sleep 1000'
  } > "$T/bin/$name"
  chmod +x "$T/bin/$name"
done

"$LUMEND" --help > "$T/help" || fail "--help exited non-zero"
grep -q -- "--nvme-dir" "$T/help" || fail "--help does not list --nvme-dir"

if "$LUMEND" --data-dir "$D" --listen 10.0.0.1:7000 2> "$T/err"; then
  fail "non-loopback --listen accepted"
fi
grep -q "TLS support" "$T/err" || fail "no TLS message: $(cat "$T/err")"

"$LUMEND" --data-dir "$D" --bin-dir "$T/bin" --workers 2 > "$T/out" 2> "$T/err" &
pid=$!
trap 'kill -9 $pid 2> /dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q "serving on" "$T/out" 2>/dev/null && break
  sleep 0.1
done
# The data directory is too long for a socket path there, so the socket is in the runtime dir.
sock=$(grep -o '"socket":"[^"]*"' "$D/node.json" | head -1 | cut -d'"' -f4)
[ -S "$sock" ] || [ -e "$sock" ] || fail "client socket $sock missing"
expected="lumend: serving on $sock (data dir $D)"
[ "$(cat "$T/out")" = "$expected" ] || fail "stdout is '$(cat "$T/out")', want '$expected'"

# A second lumend on the same data directory is refused.
if "$LUMEND" --data-dir "$D" --bin-dir "$T/bin" 2> "$T/err2"; then
  fail "second lumend started"
fi
grep -q "another lumend (pid $pid) is using data directory $D" "$T/err2" ||
  fail "wrong refusal: $(cat "$T/err2")"

for f in node.json prometheus_targets.json logs/lumend.log logs/worker-1.log lumend.lock; do
  [ -e "$D/$f" ] || fail "$D/$f missing"
done
grep -q '"process":"lumend"' "$D/prometheus_targets.json" || fail "lumend not in targets"
grep -q "started coordinator" "$D/logs/lumend.log" || fail "lumend.log lacks 'started coordinator'"

# Kill the memstore: lumend restarts it after 0.5 s.
memstore_pid=$(grep -o '"name":"memstore","pid":[0-9]*' "$D/node.json" | grep -o '[0-9]*$')
kill -9 "$memstore_pid"
for _ in $(seq 50); do
  grep -q '"name":"memstore","pid":[0-9]*,"up":true,"restarts":1' "$D/node.json" && break
  sleep 0.1
done
grep -q '"name":"memstore","pid":[0-9]*,"up":true,"restarts":1' "$D/node.json" ||
  fail "memstore not restarted: $(cat "$D/node.json")"

# lumend's own metrics endpoint.
metrics=$(grep -o '"lumend_metrics_address":"[^"]*"' "$D/node.json" | cut -d'"' -f4)
if command -v curl > /dev/null; then
  curl -s "http://$metrics/metrics" > "$T/metrics"
  grep -q 'lumen_process_restarts_total{process="memstore"} 1' "$T/metrics" ||
    fail "metrics: $(grep lumen_ "$T/metrics")"
  grep -q 'lumen_process_up{process="worker-1"} 1' "$T/metrics" || fail "no up gauge"
fi

child_pids=$(grep -o '"pid":[0-9]*' "$D/node.json" | grep -o '[0-9]*')
start=$(date +%s.%N)
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
elapsed=$(echo "$(date +%s.%N) - $start" | bc)
[ "$rc" = 0 ] || fail "lumend exited with $rc after SIGTERM"
echo "lumend stopped in $elapsed s"
(( $(echo "$elapsed < 10" | bc) )) || fail "stopping took $elapsed s"
(( $(echo "$elapsed >= 7.5" | bc) )) || fail "the stubborn worker was not given 8 s ($elapsed)"
for p in $child_pids; do
  kill -0 "$p" 2> /dev/null && fail "child $p still running"
done
[ -e "$D/lumend.lock" ] && fail "lock file left behind"
ls "$D/run"/*.sock "$sock" 2> /dev/null && fail "sockets left behind"
grep -q '"up":true' "$D/node.json" && fail "node.json still says up"
grep -q "SIGKILL" "$D/logs/lumend.log" || fail "no SIGKILL logged for the stubborn worker"

# --device cuda: lumend asks each real CUDA worker whether it can drive its GPU, and refuses to
# start (quoting the worker) when one cannot, instead of restarting workers that cannot run. A
# build without the CUDA toolkit has no worker_cuda, and lumend says so.
mkdir -p "$T/cudabin"
cp "$T/bin/memstore" "$T/bin/worker" "$T/bin/coordinator" "$T/cudabin/"
if [ -z "$WORKER" ]; then
  echo "no worker_cuda in this build" > "$T/probe"
  want="this build of Lumen has no CUDA worker"
else
  ln -s "$(cd "$(dirname "$WORKER")" && pwd)/$(basename "$WORKER")" "$T/cudabin/worker_cuda"
  "$WORKER" --probe --device cuda --id 0 > "$T/probe" 2>&1 || true
  want="worker-0 cannot drive GPU 0: $(head -1 "$T/probe")"
fi
if [ -n "$WORKER" ] && "$WORKER" --probe --device cuda --id 0 > /dev/null 2>&1; then
  echo "this machine has a GPU ($(cat "$T/probe")): skipping the refusal check"
else
  start=$(date +%s)
  if "$LUMEND" --data-dir "$T/cuda" --bin-dir "$T/cudabin" --device cuda > "$T/out" 2> "$T/err"; then
    fail "lumend --device cuda started without a usable GPU"
  fi
  grep -qF "$want" "$T/err" || fail "refusal does not say '$want': $(cat "$T/err")"
  [ $(( $(date +%s) - start )) -lt 30 ] || fail "the refusal took over 30 s"
  [ -e "$T/cuda/run/worker-0.sock" ] && fail "a worker was started"
  echo "refused: $(cat "$T/err")"
fi
echo PASS
