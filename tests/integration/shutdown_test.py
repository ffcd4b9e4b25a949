"""SIGTERM to lumend leaves no process, socket or shared-memory segment behind within 10 s, also
while a job runs or the workers measure their devices; a second lumend on the same data directory is refused."""

import glob
import os
import signal
import subprocess
import time
import unittest

import lumen_node


def sysv_segments():
    """Keys of the System V shared-memory segments (UCX allocates the memstore's arena there)."""
    try:
        with open("/proc/sysvipc/shm") as f:
            return {line.split()[1] for line in f.readlines()[1:] if line.strip()}
    except FileNotFoundError:
        return set()


class ShutdownTest(unittest.TestCase):
    def stop_node(self, node):
        """SIGTERMs lumend and checks that it and its 4 children stopped by themselves within
        10 s (none needed SIGKILL)."""
        start = time.time()
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(timeout=10)
        elapsed = time.time() - start
        with open(os.path.join(node.data_dir, "logs", "lumend.log")) as f:
            lumend_log = f.read()
        self.assertLess(elapsed, 10)
        if "sending SIGKILL" in lumend_log:
            for name in ("coordinator", "worker-0", "worker-1", "memstore"):
                with open(os.path.join(node.data_dir, "logs", name + ".log")) as f:
                    print("==== %s.log (tail)" % name, "".join(f.readlines()[-15:]))
        self.assertNotIn("sending SIGKILL", lumend_log)
        self.assertEqual(lumend_log.count("exited with status 0"), 4, lumend_log)

    def test_sigterm_cleans_up_everything(self):
        shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        sysv_before = sysv_segments()
        node = lumen_node.Node(workers=2)
        node.start()
        try:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 20000)
            job = node.submit(lumen_node.job_yaml(data, steps=100000))
            node.wait_job(job["id"], states=("RUNNING",))
            # A second lumend on the same data directory is refused.
            second = subprocess.run([lumen_node.runfile("lumend/lumend"), "--data-dir",
                                     node.data_dir, "--bin-dir", lumen_node.bin_dir(node.tmp)],
                                    capture_output=True, text=True, timeout=30)
            self.assertNotEqual(second.returncode, 0)
            self.assertIn("another lumend", second.stdout + second.stderr)
            pids = [int(p["pid"]) for p in node.node_status()["processes"]]
            self.assertEqual(len(pids), 4)  # coordinator, memstore, 2 workers
            sockets = glob.glob(os.path.join(node.data_dir, "run", "*.sock")) + [node.socket]
            self.stop_node(node)
        finally:
            node.stop()
        self.assertEqual(node.proc.returncode, 0)
        self.assertEqual([p for p in pids if lumen_node.pid_alive(p)], [])
        self.assertEqual([s for s in sockets if os.path.exists(s)], [])
        shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        self.assertEqual(shm_after - shm_before, set())
        self.assertEqual(sysv_segments() - sysv_before, set())

    def test_sigterm_while_workers_measure_their_devices(self):
        # At a node's first start each worker measures its device in turn (a few seconds
        # each); a stop then must not wait for the measurements or need SIGKILL.
        node = lumen_node.Node(workers=2)
        node.start(wait_ready=False)
        try:
            self.stop_node(node)
        finally:
            node.stop()


if __name__ == "__main__":
    lumen_node.main()
