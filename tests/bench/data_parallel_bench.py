"""A job on two workers (resources.workers: 2, data parallel) against the same job on one, on
one two-worker CPU node in the same run: each worker has half the cores (lumend's --threads),
so two replicas should train about twice the tokens per second of one, less the gradient
exchange through the memstore. Prints one JSON object: median step time of the steps after the
first (traced), tokens/s, the speed-up, the largest relative loss difference, and whether the
state was offloaded (a --device-memory below it: the replicas then share one copy of it in the
memstore).

    bazel run -c opt //tests/bench:data_parallel_bench [-- --steps N] [-- --hidden H]
        [-- --device-memory 8MiB]
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Under `bazel run` this file is <runfiles>/lumen/tests/bench/data_parallel_bench.py.
if not os.environ.get("RUNFILES_DIR"):
    os.environ["RUNFILES_DIR"] = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(os.environ["RUNFILES_DIR"], "lumen", "tests", "integration"))
import lumen_node  # noqa: E402


def job_yaml(name, data, hidden, layers, steps, workers):
    inter = (hidden * 11 // 4 + 7) // 8 * 8
    heads = max(1, hidden // 64)
    return (
        "name: %s\n"
        "model: {hidden_size: %d, intermediate_size: %d, num_hidden_layers: %d, "
        "num_attention_heads: %d, num_key_value_heads: %d, vocab_size: 256, "
        "max_position_embeddings: 256}\n"
        "data: {path: %s, token_dtype: uint16}\n"
        "train: {steps: %d, seq_len: 256, micro_batch_size: 1, grad_accum_steps: 8}\n"
        "optimizer: {lr: 1.0e-3, grad_clip: 1.0}\n"
        "resources: {workers: %d}\n" % (name, hidden, inter, layers, heads, heads, data, steps,
                                        workers))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device-memory", default="2GiB")
    parser.add_argument("--host-memory", default="512MiB")
    args = parser.parse_args()
    result = {"bench": "data_parallel", "cpus": os.cpu_count(), "hidden": args.hidden,
              "layers": args.layers, "tokens_per_step": 8 * 256,
              "device_memory": args.device_memory}
    with lumen_node.Node(workers=2, device_memory=args.device_memory,
                         host_memory=args.host_memory) as node:
        data = os.path.join(node.tmp, "train.bin")
        lumen_node.write_tokens(data, 200000)
        runs = {}
        for workers in (2, 1):
            job = node.submit(job_yaml("w%d" % workers, data, args.hidden, args.layers,
                                       args.steps, workers), name="w%d.yaml" % workers)
            ended = node.wait_job(job["id"], timeout=3600)
            if ended["state"] != "SUCCEEDED":
                raise SystemExit("job on %d workers: %s" % (workers, ended))
            steps = node.ctl_json("logs", job["id"])
            runs[workers] = steps
            step_s = statistics.median(s["step_time_s"] for s in steps[1:])
            result["workers_%d" % workers] = {
                "median_step_s": round(step_s, 4),
                "tokens_per_s": round(result["tokens_per_step"] / step_s, 1),
                "offloaded": int(steps[-1].get("bytes_moved", {}).get("host->device", 0)) > 0,
            }
        result["speedup"] = round(result["workers_2"]["tokens_per_s"] /
                                  result["workers_1"]["tokens_per_s"], 3)
        result["max_relative_loss_difference"] = max(
            abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(runs[2], runs[1]))
        result["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
