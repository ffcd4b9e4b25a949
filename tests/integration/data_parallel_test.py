"""A job on two workers (resources.workers: 2) trains a replica on each, their gradients summed
through the memstore: its losses match the same job on one worker to rounding, replica 0
alone reports steps and writes the checkpoint, and nothing is left in the memstore. A replica
whose worker is killed stops the other, and the job resumes from its checkpoint with the
losses of an uninterrupted run."""

import os
import re
import signal
import time
import unittest

import lumen_node

SPEC = """name: %s
model: {preset: tiny}
data: {path: %s, token_dtype: uint16}
train: {steps: %d, seq_len: 32, micro_batch_size: 2, grad_accum_steps: 4, seed: 5}
optimizer: {lr: 3.0e-3, weight_decay: 0.1, grad_clip: 1.0}
resources: {workers: %d}
checkpoint: {every_steps: 10}
"""


def worker_metrics(node, worker):
    """The worker's unlabelled-by-pair counters and gauges, by name."""
    values = {}
    for line in node.metrics(worker):
        if line.startswith("lumen_worker_") and "{" in line:
            values[line.split("{")[0]] = float(line.split()[-1])
    return values


def log_time(node, process, pattern):
    """The glog time (month, day, time of day) of the first line of `process`'s log that
    matches `pattern`."""
    with open(os.path.join(node.data_dir, "logs", process + ".log")) as f:
        for line in f:
            if re.search(pattern, line):
                return line[1:5], line[6:21]
    raise AssertionError("no line of %s.log matches %r" % (process, pattern))


class DataParallelTest(unittest.TestCase):
    def test_two_replicas_match_one_worker(self):
        with lumen_node.Node(workers=2) as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            pair = node.submit(SPEC % ("pair", data, 8, 2), name="pair.yaml")
            one = node.submit(SPEC % ("one", data, 8, 1), name="one.yaml")
            # Both claims are per worker; the pair holds them on two.
            self.assertEqual(pair["spec"]["resources"]["workers"], "2")
            ended = [node.wait_job(j["id"]) for j in (pair, one)]
            for job in ended:
                self.assertEqual(job["state"], "SUCCEEDED", job)
            self.assertEqual(ended[0]["worker"], "worker-0,worker-1")
            # The planner predicted the pair's step as data-parallel replicas.
            self.assertGreater(float(ended[0].get("predicted_step_time_s", 0)), 0, ended[0])
            seconds = [(int(j["end_time_unix_ms"]) - int(j["start_time_unix_ms"])) / 1e3
                       for j in ended]
            print("8 steps on two workers: %.2f s; on one: %.2f s (each worker has %s of the "
                  "cores)" % (seconds[0], seconds[1], "half" if os.cpu_count() > 1 else "all"))
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
            # Each worker's metrics count its own replica's steps and share of the tokens:
            # worker-1 trained 8 steps of the pair; worker-0 those 8 and the single job's 8.
            metrics = {w: worker_metrics(node, w) for w in ("worker-0", "worker-1")}
            tokens = 4 * 2 * 32
            self.assertEqual(metrics["worker-1"]["lumen_worker_steps_total"], 8, metrics)
            self.assertEqual(metrics["worker-1"]["lumen_worker_tokens_total"], 8 * tokens / 2)
            self.assertEqual(metrics["worker-0"]["lumen_worker_steps_total"], 16, metrics)
            self.assertEqual(metrics["worker-0"]["lumen_worker_tokens_total"],
                             8 * tokens / 2 + 8 * tokens)

    def test_offloaded_replicas_share_the_state_in_the_memstore(self):
        """A state far larger than each worker's device memory: the replicas share one copy of
        the parameters and moments in the memstore, and train as the 1-worker offloaded job."""
        spec = SPEC.replace("model: {preset: tiny}", "model: {preset: tiny, num_hidden_layers: 16}")
        with lumen_node.Node(workers=2, device_memory="1MiB") as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            pair = node.submit(spec % ("pair", data, 6, 2), name="pair.yaml")
            one = node.submit(spec % ("one", data, 6, 1), name="one.yaml")
            ended = [node.wait_job(j["id"]) for j in (pair, one)]
            for job in ended:
                self.assertEqual(job["state"], "SUCCEEDED",
                                 job.get("failure_reason", "") + node.output())
            self.assertEqual(ended[0]["worker"], "worker-0,worker-1")
            params = int(ended[0]["parameter_count"])
            self.assertGreater(16 * params, 10 * (1 << 20))  # state > 10x the device budget
            steps = [node.ctl_json("logs", j["id"]) for j in (pair, one)]
            self.assertEqual(len(steps[0]), 6)
            for a, b in zip(*steps):
                self.assertEqual(a["tokens"], b["tokens"])
                self.assertAlmostEqual(a["loss"], b["loss"], delta=1e-4 * b["loss"])
                self.assertAlmostEqual(a["grad_norm"], b["grad_norm"],
                                       delta=1e-3 * b["grad_norm"])
                self.assertGreater(int(a["bytes_moved"]["host->device"]), 4 * params // 2)
                self.assertLessEqual(int(a["device_memory_peak_bytes"]), 1 << 20)
            self.assertTrue(os.path.isfile(os.path.join(ended[0]["final_checkpoint"],
                                                        "model.safetensors")))
            # Everything, shared and per replica, was freed with the job.
            cluster = node.ctl_json("cluster")[0]
            held = sum(int(t.get("used_bytes", 0)) for t in cluster["tiers"])
            self.assertEqual(held, 0, cluster)

    def test_a_killed_replica_resumes_the_job_from_its_checkpoint(self):
        self.kill_and_resume(SPEC, steps=60, kill="worker-1", device_memory="256MiB")

    def test_killing_the_replica_that_holds_the_shared_state_resumes_the_job(self):
        """Offloaded: replica 0 placed the state the replicas share; killed, the job resumes
        from its checkpoint all the same."""
        spec = SPEC.replace("model: {preset: tiny}", "model: {preset: tiny, num_hidden_layers: 16}")
        self.kill_and_resume(spec, steps=24, kill="worker-0", device_memory="1MiB")

    def kill_and_resume(self, spec, steps, kill, device_memory):
        """Trains the 2-worker job once uninterrupted, then again with `kill` SIGKILLed after
        step 13: it resumes from its step-10 checkpoint with the same losses, bit for bit."""
        with lumen_node.Node(workers=2, device_memory=device_memory) as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            reference = node.submit(spec % ("reference", data, steps, 2), name="reference.yaml")
            # Both waits end well inside the test's timeout, so a job that hangs fails with the
            # node's logs.
            ended = node.wait_job(reference["id"], timeout=90)
            self.assertEqual(ended["state"], "SUCCEEDED", ended)
            want = [s["loss"] for s in node.ctl_json("logs", reference["id"])]
            job = node.submit(spec % ("killed", data, steps, 2), name="killed.yaml")
            deadline = time.time() + 120
            while time.time() < deadline:
                j = node.job(job["id"])
                self.assertIn(j["state"], ("QUEUED", "RUNNING"), j)
                if int(j.get("latest_step", {}).get("step", 0)) >= 13:
                    break
                time.sleep(0.02)
            os.kill(int(node.process(kill)["pid"]), signal.SIGKILL)
            ended = node.wait_job(job["id"], timeout=120)
            self.assertEqual(ended["state"], "SUCCEEDED", ended.get("failure_reason", "") +
                             node.output())
            # Resumed once, or again if a worker was still ending the stopped replica when the
            # job came back (ABORTED: it is busy; the job is queued again).
            self.assertGreaterEqual(int(ended["resumes"]), 1, ended)
            self.assertIn("worker-", ended["resume_reason"])
            self.assertRegex(os.path.basename(ended["resumed_from"]), r"^step-[1-9]\d*0$")
            # Planned on both workers, the one lumend was restarting too.
            self.assertGreater(float(ended.get("predicted_step_time_s", 0)), 0, ended)
            steps_done = node.ctl_json("logs", job["id"])
            self.assertEqual([int(s["step"]) for s in steps_done], list(range(1, steps + 1)))
            # Bit for bit: the replicas load the same checkpoint and sum in the same order.
            self.assertEqual([s["loss"] for s in steps_done], want)
            # The coordinator queued the job again only once the surviving replica's task had
            # stopped (it could still write to the memstore until then).
            survivor = "worker-1" if kill == "worker-0" else "worker-0"
            stopped = log_time(node, survivor, r"service\.cc:\d+\] %s: (?!started)" % job["id"])
            requeued = log_time(node, "coordinator", r"\] %s: .*queued again" % job["id"])
            self.assertLessEqual(stopped, requeued)
            # Both runs' tensors were freed, what the stopped replica wrote late too.
            cluster = node.ctl_json("cluster")[0]
            held = sum(int(t.get("used_bytes", 0)) for t in cluster["tiers"])
            self.assertEqual(held, 0, cluster)

if __name__ == "__main__":
    lumen_node.main()
