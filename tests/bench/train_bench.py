#!/usr/bin/python3
"""Training throughput of Lumen's CPU engine against PyTorch: bazel run //tests/bench:train_bench

For each vocabulary size it writes a random uint16 token file, runs lumen_train_bench (which
exports its initial weights) and then pytorch_train_bench.py on the same weights, batches and
thread count, and prints one JSON object a line with both tokens/s, their ratio and whether
Lumen meets the target (>= 1.2x PyTorch). Both sides run one after the other in this
invocation, so they see the same machine load. Exit status 0 even when a target is missed
(it is a measurement); non-zero when a side fails to run.

Flags: --vocabs=256,32000 --threads=2 --lumen-steps=5 --torch-steps=3 --warmup=1
       --repeats=2 --target=1.2 --python=/usr/bin/python3
"""
import argparse
import array
import json
import os
import random
import subprocess
import sys
import tempfile


MODEL = {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 688, "seq": 256, "batch": 8}


def runfile(rel):
    """Finds `rel` (a workspace-relative path) in the runfiles tree or the source tree."""
    roots = []
    if os.environ.get("RUNFILES_DIR"):
        roots.append(os.path.join(os.environ["RUNFILES_DIR"], "lumen"))
    roots.append(os.path.abspath(sys.argv[0]) + ".runfiles/lumen")
    roots.append(os.getcwd())
    here = os.path.dirname(os.path.abspath(__file__))
    roots.append(os.path.join(here, "..", "..", "bazel-bin"))
    roots.append(os.path.join(here, "..", ".."))
    for root in roots:
        path = os.path.join(root, rel)
        if os.path.exists(path):
            return path
    sys.exit("train_bench: cannot find %s (run it with bazel run //tests/bench:train_bench)" % rel)


def run_json(cmd, env, what):
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit("train_bench: %s failed (exit %d): %s" % (what, p.returncode, p.stderr.strip()))
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="256,32000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lumen-steps", type=int, default=5)
    ap.add_argument("--torch-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--target", type=float, default=1.2)
    ap.add_argument("--python", default="/usr/bin/python3")
    a = ap.parse_args()
    lumen = runfile("tests/bench/lumen_train_bench")
    torch_bench = runfile("tests/bench/pytorch_train_bench.py")
    reference = runfile("worker/engine/torch_reference.py")
    env = dict(os.environ)
    threads = str(a.threads)
    # Debian's torch runs its matrix products in OpenBLAS, whose pool follows
    # OPENBLAS_NUM_THREADS; ATen's own loops follow OMP_NUM_THREADS / set_num_threads.
    env.update({"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads})
    # PyTorch's idle OpenMP workers otherwise spin while OpenBLAS's threads multiply, which
    # oversubscribes the cores and made PyTorch 2-10x slower here: passive waiting gives it
    # its best figure (it matches torch.set_num_threads(1) with 2 OpenBLAS threads).
    torch_env = dict(env, OMP_WAIT_POLICY="PASSIVE")
    with tempfile.TemporaryDirectory(prefix="lumen_train_bench_") as tmp:
        for vocab in [int(v) for v in a.vocabs.split(",")]:
            data = os.path.join(tmp, "tokens_%d.bin" % vocab)
            rng = random.Random(1)
            toks = array.array("H", (rng.randrange(vocab) for _ in range(1 << 18)))
            if sys.byteorder != "little":
                toks.byteswap()
            with open(data, "wb") as f:
                toks.tofile(f)
            model_dir = os.path.join(tmp, "model_%d" % vocab)
            flags = ["--%s=%d" % kv for kv in MODEL.items()]
            # Alternate the two sides `repeats` times and keep each side's best run, so a
            # burst of load from other processes hurts neither side alone.
            ours, theirs = None, None
            for _ in range(a.repeats):
                o = run_json([lumen, "--data=" + data, "--export_dir=" + model_dir,
                              "--vocab=%d" % vocab, "--threads=" + threads,
                              "--warmup=%d" % a.warmup, "--steps=%d" % a.lumen_steps] + flags,
                             env, "lumen_train_bench")
                t = run_json([a.python, torch_bench, "--reference", reference,
                              "--model-dir", model_dir, "--data", data,
                              "--seq", str(MODEL["seq"]), "--batch", str(MODEL["batch"]),
                              "--threads", threads, "--warmup", str(a.warmup),
                              "--steps", str(a.torch_steps)], torch_env, "pytorch_train_bench")
                if ours is None or o["tokens_per_s"] > ours["tokens_per_s"]:
                    ours = o
                if theirs is None or t["tokens_per_s"] > theirs["tokens_per_s"]:
                    theirs = t
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            meets = ratio >= a.target
            out = {"benchmark": "train_tokens_per_s", "vocab": vocab, "threads": a.threads,
                   "layers": MODEL["layers"], "hidden": MODEL["hidden"], "heads": MODEL["heads"],
                   "seq": MODEL["seq"], "micro_batch": MODEL["batch"],
                   "lumen_tokens_per_s": ours["tokens_per_s"],
                   "pytorch_tokens_per_s": theirs["tokens_per_s"],
                   "ratio": round(ratio, 3), "target_ratio": a.target, "meets_target": meets,
                   "lumen_step_time_s": ours["step_time_s"],
                   "pytorch_step_time_s": theirs["step_time_s"],
                   "lumen_timed_steps": ours["timed_steps"],
                   "pytorch_timed_steps": theirs["timed_steps"],
                   # Step-0 losses agree when both trained the same model on the same batch.
                   "lumen_first_loss": ours["first_loss"],
                   "pytorch_first_loss": theirs["first_loss"],
                   "repeats": a.repeats,
                   "load_avg_1m": round(os.getloadavg()[0], 2),
                   "pytorch_version": theirs["torch_version"]}
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
