"""kill -9 of a worker mid-job and of the coordinator: lumend restarts them, jobs end with a
clear reason, nothing hangs, and the job history survives."""

import os
import signal
import subprocess
import time
import unittest

import lumen_node


class CrashTest(unittest.TestCase):
    def test_worker_killed_mid_job(self):
        with lumen_node.Node() as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 50000)
            job = node.submit(lumen_node.job_yaml(data, name="long", steps=100000))
            deadline = time.time() + 120
            while time.time() < deadline:
                j = node.job(job["id"])
                if j["state"] == "RUNNING" and int(j.get("latest_step", {}).get("step", 0)) >= 2:
                    break
                time.sleep(0.1)
            watcher = subprocess.Popen([lumen_node.runfile("client/lumenctl"), "--socket",
                                        node.socket, "watch", job["id"]],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            worker = node.process("worker-0")
            os.kill(int(worker["pid"]), signal.SIGKILL)
            ended = node.wait_job(job["id"], timeout=60)
            self.assertEqual(ended["state"], "FAILED")
            self.assertIn("worker-0", ended["failure_reason"])
            out, _ = watcher.communicate(timeout=60)
            self.assertEqual(watcher.returncode, 1, out)  # watch exits 0 only on success
            self.assertIn("FAILED: worker-0", out)
            # lumend restarts the worker and reports it.
            deadline = time.time() + 30
            while time.time() < deadline:
                w = node.process("worker-0")
                if int(w["restarts"]) >= 1 and w["up"]:
                    break
                time.sleep(0.2)
            self.assertGreaterEqual(int(node.process("worker-0")["restarts"]), 1)
            cluster = node.ctl("cluster").stdout
            self.assertIn("worker-0", cluster)
            # The next job runs on the restarted worker.
            nxt = node.submit(lumen_node.job_yaml(data, name="after", steps=3))
            self.assertEqual(node.wait_job(nxt["id"], timeout=120)["state"], "SUCCEEDED",
                             node.output())

    def test_worker_killed_mid_offloaded_job_leaves_nothing_in_the_memstore(self):
        # 1 MiB of device memory: the job's state streams through the memstore, so the killed
        # worker leaves its tensors (and maybe a pin) there; the coordinator frees them.
        with lumen_node.Node(device_memory="1MiB") as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            job = node.submit(lumen_node.job_yaml(data, name="offloaded", steps=100000))
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
            ended = node.wait_job(job["id"], timeout=60)
            self.assertEqual(ended["state"], "FAILED")
            cluster = node.ctl_json("cluster")[0]
            self.assertEqual(sum(int(t.get("used_bytes", 0)) for t in cluster["tiers"]), 0,
                             cluster)
            with open(os.path.join(node.data_dir, "logs", "coordinator.log")) as log:
                self.assertIn("freed what the job left in the memstore", log.read())

    def test_coordinator_killed_keeps_history(self):
        with lumen_node.Node() as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 20000)
            ids = []
            for i in range(2):
                job = node.submit(lumen_node.job_yaml(data, name="h%d" % i, steps=4))
                ids.append(job["id"])
            for job_id in ids:
                self.assertEqual(node.wait_job(job_id)["state"], "SUCCEEDED")
            running = node.submit(lumen_node.job_yaml(data, name="cut", steps=100000))
            node.wait_job(running["id"], states=("RUNNING",))
            coordinator = node.process("coordinator")
            os.kill(int(coordinator["pid"]), signal.SIGKILL)
            deadline = time.time() + 30
            while time.time() < deadline:
                c = node.process("coordinator")
                if int(c["restarts"]) >= 1 and c["up"]:
                    if node.ctl("jobs", check=False).returncode == 0:
                        break
                time.sleep(0.2)
            jobs = {j["id"]: j for j in node.ctl_json("jobs")}
            self.assertEqual(set(jobs), set(ids + [running["id"]]))
            for job_id in ids:
                self.assertEqual(jobs[job_id]["state"], "SUCCEEDED")
                steps = node.ctl_json("logs", job_id)
                self.assertEqual(len(steps), 4)
            cut = jobs[running["id"]]
            self.assertEqual(cut["state"], "FAILED")
            self.assertIn("coordinator stopped", cut["failure_reason"])
            # The restarted coordinator keeps numbering after the old jobs and runs new ones.
            nxt = node.submit(lumen_node.job_yaml(data, name="new", steps=2))
            self.assertGreater(nxt["id"], running["id"])
            self.assertEqual(node.wait_job(nxt["id"], timeout=120)["state"], "SUCCEEDED",
                             node.output())


if __name__ == "__main__":
    lumen_node.main()
