"""kill -9 of a worker mid-job, of the coordinator, and a stop of the whole node: lumend
restarts what died, the interrupted job goes back to the head of the queue and continues from
its latest checkpoint, and its losses are those of a run that was never interrupted. Nothing
hangs, and the job history holds each step once."""

import os
import signal
import subprocess
import time
import unittest

import lumen_node

STEPS = 600  # about 3 s on 2 cores: time to interrupt the job past its first checkpoint
EVERY = 25


def resumable(data, name, steps=STEPS):
    return lumen_node.job_yaml(data, name=name, steps=steps, seq_len=64, batch=8,
                               extra="checkpoint: {every_steps: %d}\n" % EVERY)


def wait_past_checkpoint(node, job_id, step=EVERY + 3):
    """Waits until the job runs past its first checkpoint (so a resume has one to continue
    from, and steps after it to train again)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        j = node.job(job_id)
        if j["state"] not in ("QUEUED", "RUNNING"):
            raise AssertionError("the job ended before it could be interrupted: %s" % j)
        if int(j.get("latest_step", {}).get("step", 0)) >= step:
            return j
        time.sleep(0.05)
    raise AssertionError("the job did not reach step %d: %s" % (step, node.job(job_id)))


def submit_offloaded(node):
    """A 40-step job checkpointed every 5 steps whose state streams through the memstore (the
    node's device budget is 1 MiB)."""
    data = os.path.join(node.tmp, "train.bin")
    lumen_node.write_tokens(data, 30000)
    return node.submit(lumen_node.job_yaml(data, name="offloaded", steps=40,
                                           extra="checkpoint: {every_steps: 5}\n"))


def losses(node, job_id):
    steps = node.ctl_json("logs", job_id)
    return [int(s["step"]) for s in steps], [s["loss"] for s in steps]


class CrashTest(unittest.TestCase):
    def check_resumed(self, node, job_id, reference, cause):
        ended = node.wait_job(job_id, timeout=300)
        self.assertEqual(ended["state"], "SUCCEEDED", ended.get("failure_reason", "") +
                         node.output())
        self.assertEqual(int(ended["resumes"]), 1, ended)
        self.assertIn(cause, ended["resume_reason"])
        # It continued from a checkpoint at or after the first, not from the start.
        resumed_from = ended["resumed_from"]
        self.assertRegex(os.path.basename(resumed_from), r"^step-\d+$")
        self.assertGreaterEqual(int(os.path.basename(resumed_from)[5:]), EVERY)
        steps, got = losses(node, job_id)
        self.assertEqual(steps, list(range(1, STEPS + 1)))  # each step once
        self.assertEqual(got, reference)  # bit for bit: the same batches, weights and moments
        status = node.ctl("status", job_id).stdout
        self.assertIn("resumed:     1 time", status)
        self.assertIn("continued from " + resumed_from, status)
        return ended

    def reference(self, node, data):
        job = node.submit(resumable(data, "reference"))
        ended = node.wait_job(job["id"], timeout=300)
        self.assertEqual(ended["state"], "SUCCEEDED")
        print("reference job: %d steps in %.2f s" % (
            STEPS, (int(ended["end_time_unix_ms"]) - int(ended["start_time_unix_ms"])) / 1e3))
        return losses(node, job["id"])[1]

    def test_worker_killed_mid_job_resumes_from_its_checkpoint(self):
        with lumen_node.Node() as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 50000)
            reference = self.reference(node, data)
            job = node.submit(resumable(data, "long"))
            wait_past_checkpoint(node, job["id"])
            watcher = subprocess.Popen([lumen_node.runfile("client/lumenctl"), "--socket",
                                        node.socket, "watch", job["id"]],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            os.kill(int(node.process("worker-0")["pid"]), signal.SIGKILL)
            self.check_resumed(node, job["id"], reference, "worker-0")
            # The watch followed the job through its resume to its end.
            out, _ = watcher.communicate(timeout=60)
            self.assertEqual(watcher.returncode, 0, out)
            self.assertIn("SUCCEEDED", out)
            self.assertGreaterEqual(int(node.process("worker-0")["restarts"]), 1)

    def test_worker_killed_mid_offloaded_job_leaves_nothing_in_the_memstore(self):
        # 1 MiB of device memory: the job's state streams through the memstore, so the killed
        # worker leaves its tensors (and maybe a pin) there; the coordinator frees them before
        # the job resumes.
        with lumen_node.Node(device_memory="1MiB") as node:
            job = submit_offloaded(node)
            deadline = time.time() + 120
            held = 0
            while time.time() < deadline:
                j = node.job(job["id"])
                cluster = node.ctl_json("cluster")[0]
                held = sum(int(t.get("used_bytes", 0)) for t in cluster["tiers"])
                if j["state"] == "RUNNING" and int(j.get("latest_step", {}).get("step", 0)) >= 1 \
                        and held > 0:
                    break
                time.sleep(0.1)
            self.assertGreater(held, 0, "the job never put tensors in the memstore")
            os.kill(int(node.process("worker-0")["pid"]), signal.SIGKILL)
            ended = node.wait_job(job["id"], timeout=300)
            self.assertEqual(ended["state"], "SUCCEEDED", node.output())
            self.assertEqual(int(ended["resumes"]), 1)
            cluster = node.ctl_json("cluster")[0]
            self.assertEqual(sum(int(t.get("used_bytes", 0)) for t in cluster["tiers"]), 0,
                             cluster)
            with open(os.path.join(node.data_dir, "logs", "coordinator.log")) as log:
                self.assertIn("freed what the job left in the memstore", log.read())

    def test_memstore_killed_mid_offloaded_job_resumes_it(self):
        # The job's tensors were in the memstore's host memory, lost with it: the worker's
        # run fails and the job continues from its checkpoint once lumend restarted the
        # memstore.
        with lumen_node.Node(device_memory="1MiB") as node:
            job = submit_offloaded(node)
            wait_past_checkpoint(node, job["id"], step=6)
            os.kill(int(node.process("memstore")["pid"]), signal.SIGKILL)
            ended = node.wait_job(job["id"], timeout=300)
            self.assertEqual(ended["state"], "SUCCEEDED", str(ended) + node.output())
            self.assertEqual(int(ended["resumes"]), 1, ended)
            steps, _ = losses(node, job["id"])
            self.assertEqual(steps, list(range(1, 41)))

    def test_coordinator_killed_keeps_history_and_resumes_the_running_job(self):
        with lumen_node.Node() as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 20000)
            ids = []
            for i in range(2):
                job = node.submit(lumen_node.job_yaml(data, name="h%d" % i, steps=4))
                ids.append(job["id"])
            for job_id in ids:
                self.assertEqual(node.wait_job(job_id)["state"], "SUCCEEDED")
            reference = self.reference(node, data)
            cut = node.submit(resumable(data, "cut"))
            wait_past_checkpoint(node, cut["id"])
            os.kill(int(node.process("coordinator")["pid"]), signal.SIGKILL)
            deadline = time.time() + 30
            while time.time() < deadline:
                c = node.process("coordinator")
                if int(c["restarts"]) >= 1 and c["up"]:
                    if node.ctl("jobs", check=False).returncode == 0:
                        break
                time.sleep(0.2)
            jobs = {j["id"]: j for j in node.ctl_json("jobs")}
            self.assertIn(cut["id"], jobs)
            self.assertTrue(set(ids) <= set(jobs), jobs)
            for job_id in ids:
                self.assertEqual(jobs[job_id]["state"], "SUCCEEDED")
                self.assertEqual(len(node.ctl_json("logs", job_id)), 4)
            self.check_resumed(node, cut["id"], reference, "coordinator stopped")
            # The restarted coordinator keeps numbering after the old jobs and runs new ones.
            nxt = node.submit(lumen_node.job_yaml(data, name="new", steps=2))
            self.assertGreater(nxt["id"], cut["id"])
            self.assertEqual(node.wait_job(nxt["id"], timeout=120)["state"], "SUCCEEDED",
                             node.output())

    def test_node_stopped_mid_job_resumes_at_its_next_start(self):
        node = lumen_node.Node()
        node.start()
        try:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 20000)
            reference = self.reference(node, data)
            job = node.submit(resumable(data, "stopped"))
            wait_past_checkpoint(node, job["id"])
            node._stop(15)  # SIGTERM: lumend stops every process
            self.assertEqual(node.proc.returncode, 0)
            node.start()
            self.check_resumed(node, job["id"], reference, "coordinator stopped")
        finally:
            node.stop()


if __name__ == "__main__":
    lumen_node.main()
