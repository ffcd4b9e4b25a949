"""A job on two workers (resources.workers: 2) trains a replica on each, their gradients summed
through the memstore: its losses match the same job on one worker to rounding, replica 0
alone reports steps and writes the checkpoint, and nothing is left in the memstore."""

import os
import unittest

import lumen_node

SPEC = """name: %s
model: {preset: tiny}
data: {path: %s, token_dtype: uint16}
train: {steps: 8, seq_len: 32, micro_batch_size: 2, grad_accum_steps: 4, seed: 5}
optimizer: {lr: 3.0e-3, weight_decay: 0.1, grad_clip: 1.0}
resources: {workers: %d}
"""


class DataParallelTest(unittest.TestCase):
    def test_two_replicas_match_one_worker(self):
        with lumen_node.Node(workers=2) as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            pair = node.submit(SPEC % ("pair", data, 2), name="pair.yaml")
            one = node.submit(SPEC % ("one", data, 1), name="one.yaml")
            # Both claims are per worker; the pair holds them on two.
            self.assertEqual(pair["spec"]["resources"]["workers"], "2")
            ended = [node.wait_job(j["id"]) for j in (pair, one)]
            for job in ended:
                self.assertEqual(job["state"], "SUCCEEDED", job)
            self.assertEqual(ended[0]["worker"], "worker-0,worker-1")
            # The single-worker job waited for the pair (it needed one of its workers).
            self.assertGreaterEqual(int(ended[1]["start_time_unix_ms"]),
                                    int(ended[0]["end_time_unix_ms"]))
            steps = [node.ctl_json("logs", j["id"]) for j in (pair, one)]
            self.assertEqual([s["step"] for s in steps[0]], [str(i) for i in range(1, 9)])
            for a, b in zip(*steps):
                self.assertEqual(a["tokens"], b["tokens"])  # the whole step's: 4 x 2 x 32
                self.assertAlmostEqual(a["loss"], b["loss"], delta=1e-4 * b["loss"])
                self.assertAlmostEqual(a["grad_norm"], b["grad_norm"],
                                       delta=1e-3 * b["grad_norm"])
            self.assertTrue(os.path.isfile(os.path.join(ended[0]["final_checkpoint"],
                                                        "model.safetensors")))
            # The replicas' exchange was freed with the job.
            cluster = node.ctl_json("cluster")[0]
            held = sum(int(t.get("used_bytes", 0)) for t in cluster["tiers"])
            self.assertEqual(held, 0, cluster)
            with open(os.path.join(node.data_dir, "logs", "worker-1.log")) as f:
                log = f.read()
            self.assertIn("replica 1 of 2, micro-batches 2 to 3 of each step's 4", log)


if __name__ == "__main__":
    lumen_node.main()
