"""Three lumenctl clients submit three jobs at once and watch them: all succeed, in FIFO order."""

import os
import subprocess
import unittest

import lumen_node


class ConcurrentClientsTest(unittest.TestCase):
    def test_three_clients_submit_and_watch(self):
        with lumen_node.Node() as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 20000)
            specs = []
            for i in range(3):
                path = os.path.join(node.tmp, "job%d.yaml" % i)
                with open(path, "w") as f:
                    f.write(lumen_node.job_yaml(data, name="client%d" % i, steps=6))
                specs.append(path)
            procs = [subprocess.Popen([lumen_node.runfile("client/lumenctl"), "--socket",
                                       node.socket, "submit", spec, "--watch"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for spec in specs]
            outs = [p.communicate(timeout=300) for p in procs]
            for p, (out, err) in zip(procs, outs):
                self.assertEqual(p.returncode, 0, out + err + node.output())
                self.assertIn("SUCCEEDED", out)
                self.assertIn("step 6/6", out)
            jobs = node.ctl_json("jobs")
            self.assertEqual(len(jobs), 3)
            self.assertEqual(sorted(j["spec"]["name"] for j in jobs),
                             ["client0", "client1", "client2"])
            # FIFO: in id (= submit) order, each job started after the previous one ended.
            jobs.sort(key=lambda j: j["id"])
            for prev, nxt in zip(jobs, jobs[1:]):
                self.assertEqual(nxt["state"], "SUCCEEDED")
                self.assertGreaterEqual(int(nxt["start_time_unix_ms"]),
                                        int(prev["end_time_unix_ms"]))
                self.assertGreaterEqual(int(nxt["submit_time_unix_ms"]),
                                        int(prev["submit_time_unix_ms"]))
            for job in jobs:
                steps = node.ctl_json("logs", job["id"])
                self.assertEqual([s["step"] for s in steps], ["1", "2", "3", "4", "5", "6"])
                for s in steps:
                    for field in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                                  "device_memory_budget_bytes"):
                        self.assertIn(field, s)


if __name__ == "__main__":
    lumen_node.main()
