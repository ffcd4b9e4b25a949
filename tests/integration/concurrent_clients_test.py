"""Three lumenctl clients submit three jobs at once and watch them: all succeed, in FIFO order."""

import json
import os
import signal
import socket
import subprocess
import time
import unittest

import lumen_node


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConcurrentClientsTest(unittest.TestCase):
    def test_three_clients_submit_and_watch(self):
        port = free_port()
        with lumen_node.Node(extra_args=["--listen", "127.0.0.1:%d" % port]) as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 20000)
            # A job that keeps the worker busy while the three clients submit.
            first = node.submit(lumen_node.job_yaml(data, name="first", steps=300, seq_len=64,
                                                        batch=8))
            # Two watchers of the same job see the same stream; a third is killed mid-job.
            ctl = lumen_node.runfile("client/lumenctl")
            watchers = [subprocess.Popen([ctl, "--socket", node.socket, "logs", first["id"],
                                          "--follow", "--json"], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True) for _ in range(2)]
            doomed = subprocess.Popen([ctl, "--socket", node.socket, "watch", first["id"]],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            doomed.stdout.readline()
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            specs = []
            for i in range(3):
                path = os.path.join(node.tmp, "job%d.yaml" % i)
                with open(path, "w") as f:
                    f.write(lumen_node.job_yaml(data, name="client%d" % i, steps=6))
                specs.append(path)
            # Clients 0 and 1 use the Unix socket, client 2 loopback TCP via $LUMEN_ADDRESS.
            env_tcp = dict(os.environ, LUMEN_ADDRESS="127.0.0.1:%d" % port)
            procs = [subprocess.Popen([ctl] + (["--socket", node.socket] if i < 2 else []) +
                                      ["submit", spec, "--wait"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env_tcp if i == 2 else None)
                     for i, spec in enumerate(specs)]
            outs = [p.communicate(timeout=300) for p in procs]
            for p, (out, err) in zip(procs, outs):
                self.assertEqual(p.returncode, 0, out + err + node.output())
                self.assertIn("SUCCEEDED", out)
                self.assertIn("step 6/6", out)
            streams = [w.communicate(timeout=300) for w in watchers]
            for w, (out, err) in zip(watchers, streams):
                self.assertEqual(w.returncode, 0, err)
            # The same records (JSON map fields may print in any order).
            self.assertEqual([json.loads(line) for line in streams[0][0].splitlines()],
                             [json.loads(line) for line in streams[1][0].splitlines()])
            steps = [json.loads(line)["step"] for line in streams[0][0].splitlines()]
            self.assertEqual(steps, [str(i) for i in range(1, 301)])
            self.assertEqual(node.job(first["id"])["state"], "SUCCEEDED")
            jobs = node.ctl_json("jobs")
            self.assertEqual(len(jobs), 4)
            self.assertEqual(sorted(j["spec"]["name"] for j in jobs),
                             ["client0", "client1", "client2", "first"])
            # FIFO: in id (= submit) order, each job started after the previous one ended.
            jobs.sort(key=lambda j: j["id"])
            for prev, nxt in zip(jobs, jobs[1:]):
                self.assertEqual(nxt["state"], "SUCCEEDED")
                self.assertGreaterEqual(int(nxt["start_time_unix_ms"]),
                                        int(prev["end_time_unix_ms"]))
                self.assertGreaterEqual(int(nxt["submit_time_unix_ms"]),
                                        int(prev["submit_time_unix_ms"]))
            for job in jobs[1:]:  # the three clients' jobs
                steps = node.ctl_json("logs", job["id"])
                self.assertEqual([s["step"] for s in steps], ["1", "2", "3", "4", "5", "6"])
                for s in steps:
                    for field in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                                  "device_memory_budget_bytes"):
                        self.assertIn(field, s)


if __name__ == "__main__":
    lumen_node.main()
