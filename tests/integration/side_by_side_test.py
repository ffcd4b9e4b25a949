"""Several workers run several jobs at once: two jobs train side by side on a two-worker node,
with the same losses as each other, while a third waits for a free worker; and an offloaded job
whose memstore share does not fit beside a running one waits, saying why, and runs after it."""

import os
import time
import unittest

import lumen_node

MIB = 1 << 20

# Offloaded through a 1 MiB device: about 1.5 M parameters (24 MiB of the memstore's host tier
# with AdamW's moments).
OFFLOADED = """name: %s
model: {preset: tiny, num_hidden_layers: 32}
data: {path: %s, token_dtype: uint16}
train: {steps: %d, seq_len: 32, micro_batch_size: 2, grad_accum_steps: 2, seed: 3}
optimizer: {lr: 3.0e-3, weight_decay: 0.1}
"""


def overlap(a, b):
    return (int(a["start_time_unix_ms"]) < int(b["end_time_unix_ms"]) and
            int(b["start_time_unix_ms"]) < int(a["end_time_unix_ms"]))


class SideBySideTest(unittest.TestCase):
    def test_two_workers_train_two_jobs_at_once(self):
        with lumen_node.Node(workers=2) as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 40000)
            ids = [node.submit(lumen_node.job_yaml(data, name=name, steps=40, seq_len=64,
                                                   batch=4), name=name + ".yaml")["id"]
                   for name in ("a", "b", "c")]
            # The third waits for a worker while the first two run.
            deadline = time.time() + 120
            while time.time() < deadline:
                jobs = {j["id"]: j for j in node.ctl_json("jobs")}
                if all(jobs[i]["state"] == "RUNNING" for i in ids[:2]):
                    break
                time.sleep(0.1)
            self.assertEqual([jobs[i]["state"] for i in ids[:2]], ["RUNNING"] * 2,
                             node.output())
            self.assertEqual(jobs[ids[2]]["state"], "QUEUED")
            table = node.ctl("jobs").stdout
            self.assertIn("WORKER", table)
            self.assertIn("worker-1", table)
            ended = [node.wait_job(i) for i in ids]
            for job in ended:
                self.assertEqual(job["state"], "SUCCEEDED", job)
            a, b, c = ended
            self.assertEqual({a["worker"], b["worker"]}, {"worker-0", "worker-1"})
            self.assertTrue(overlap(a, b), (a, b))
            # c started once a worker was free.
            self.assertGreaterEqual(int(c["start_time_unix_ms"]),
                                    min(int(a["end_time_unix_ms"]), int(b["end_time_unix_ms"])))
            # Side by side, each worker has its share of the cores; the same spec trains to the
            # same losses on either.
            losses = [[s["loss"] for s in node.ctl_json("logs", i)] for i in ids]
            self.assertEqual(len(losses[0]), 40)
            self.assertEqual(losses[0], losses[1])

    def test_offloaded_job_waits_for_room_in_the_memstore(self):
        host = 40 * MIB
        with lumen_node.Node(workers=2, device_memory="1MiB",
                             host_memory="%dMiB" % (host // MIB)) as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            first = node.submit(OFFLOADED % ("first", data, 40), name="first.yaml")
            second = node.submit(OFFLOADED % ("second", data, 4), name="second.yaml")
            # Sized at submit, or (a worker still measuring its device at the node's first
            # start) by the dispatcher soon after.
            deadline = time.time() + 60
            while "claims" not in first and time.time() < deadline:
                time.sleep(0.5)
                first = node.job(first["id"])
            claim = int(first["claims"]["memstore_host_bytes"])
            self.assertTrue(claim <= host < 2 * claim,
                            "the test needs one job's claim (%d) to fit %d bytes, two not" %
                            (claim, host))
            self.assertEqual(int(first["claims"]["worker_host_bytes"]), MIB)
            # While the first runs, the second waits though worker-1 is free, and says why.
            reason = ""
            deadline = time.time() + 120
            while time.time() < deadline and not reason:
                job = node.job(second["id"])
                reason = job.get("wait_reason", "")
                if job["state"] != "QUEUED":
                    break
                time.sleep(0.2)
            self.assertIn("the memstore's host tier", reason, node.output())
            self.assertIn(first["id"], reason)
            self.assertIn("waits: the memstore's host tier", node.ctl("jobs").stdout)
            # lumenctl cluster shows which job each worker runs: the first, and nothing (the
            # other may still be measuring its device, at the node's first start).
            workers = node.ctl_json("cluster")[0]["workers"]
            self.assertEqual(sorted(w.get("running_job", "") for w in workers),
                             ["", first["id"]], workers)
            self.assertRegex(node.ctl("cluster").stdout,
                             r"worker-\d\s+%s\s+cpu" % first["id"])
            self.assertIn("waits:", node.ctl("status", second["id"]).stdout)
            a = node.wait_job(first["id"])
            b = node.wait_job(second["id"])
            self.assertEqual(a["state"], "SUCCEEDED", a)
            self.assertEqual(b["state"], "SUCCEEDED", b)
            self.assertGreaterEqual(int(b["start_time_unix_ms"]), int(a["end_time_unix_ms"]))
            self.assertEqual(b.get("wait_reason", ""), "")


if __name__ == "__main__":
    lumen_node.main()
