"""Starts a real lumend (with its coordinator, memstore and workers) in a temporary data
directory for integration tests, and runs lumenctl against it. Standard library only."""

import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

WORKSPACE = "lumen"


def runfile(path):
    """Absolute path of a runfile such as 'lumend/lumend'."""
    for root in (os.environ.get("RUNFILES_DIR"), os.environ.get("TEST_SRCDIR")):
        if root:
            candidate = os.path.join(root, WORKSPACE, path)
            if os.path.exists(candidate):
                return candidate
    here = os.path.dirname(os.path.abspath(__file__))
    candidate = os.path.join(here, "..", "..", "bazel-bin", path)
    if os.path.exists(candidate):
        return os.path.abspath(candidate)
    raise FileNotFoundError(path)


def bin_dir(tmp):
    """A folder with the daemon binaries side by side, as an installed node has them."""
    d = os.path.join(tmp, "bin")
    os.makedirs(d, exist_ok=True)
    for name, path in (("coordinator", "coordinator/coordinator"), ("worker", "worker/worker"),
                       ("memstore", "memstore/memstore")):
        link = os.path.join(d, name)
        if not os.path.exists(link):
            os.symlink(runfile(path), link)
    return d


def write_tokens(path, n, vocab=256, seed=1):
    """A uint16 token file with a learnable pattern."""
    import random
    import struct
    rng = random.Random(seed)
    text = b"the quick brown fox jumps over the lazy dog. " * (n // 45 + 1)
    tokens = [b % vocab for b in text[:n]]
    for i in range(0, n, 97):
        tokens[i] = rng.randrange(vocab)
    with open(path, "wb") as f:
        f.write(struct.pack("<%dH" % n, *tokens))


def job_yaml(data_path, name="t", steps=5, seq_len=32, batch=2, extra=""):
    return f"""name: {name}
model: {{preset: tiny}}
data: {{path: {data_path}, token_dtype: uint16}}
train: {{steps: {steps}, seq_len: {seq_len}, micro_batch_size: {batch}, grad_accum_steps: 1, seed: 1}}
optimizer: {{lr: 3.0e-3, betas: [0.9, 0.95], weight_decay: 0.1, grad_clip: 1.0}}
{extra}"""


class Node:
    """A running lumend. Use as a context manager."""

    running = set()  # the nodes started and not yet stopped, for the hang report

    def __init__(self, workers=1, extra_args=(), device_memory="256MiB", host_memory="64MiB"):
        # Under /tmp, not $TEST_TMPDIR: Bazel's temporary paths are too long for a Unix socket
        # in the data directory.
        self.tmp = tempfile.mkdtemp(prefix="lumen-", dir="/tmp")
        self.data_dir = os.path.join(self.tmp, "data")
        self.socket = os.path.join(self.data_dir, "lumend.sock")
        self.workers = workers
        self.device_memory = device_memory
        self.host_memory = host_memory
        self.extra_args = list(extra_args)
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout=30, wait_ready=True):
        """Starts lumend and waits until it serves clients; with `wait_ready`, also until every
        worker and the memstore answer with their measured figures (at a node's first start
        they measure their hardware one at a time, and until then a submit skips the
        admission check and a job runs without the coordinator's plan)."""
        args = [runfile("lumend/lumend"), "--data-dir", self.data_dir, "--workers",
                str(self.workers), "--device-memory", self.device_memory, "--host-memory",
                self.host_memory, "--bin-dir", bin_dir(self.tmp)] + self.extra_args
        self.log = open(os.path.join(self.tmp, "lumend.out"), "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        Node.running.add(self)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("lumend exited with %s:\n%s" % (self.proc.returncode,
                                                                    self.output()))
            if os.path.exists(self.socket):
                r = self.ctl("jobs", check=False)
                if r.returncode == 0:
                    if wait_ready:
                        self.wait_ready(max(timeout, 120))
                    return
            time.sleep(0.1)
        raise RuntimeError("lumend did not serve within %ss:\n%s" % (timeout, self.output()))

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        cluster = {}
        while time.time() < deadline:
            r = self.ctl("cluster", "--json", check=False)
            if r.returncode == 0 and r.stdout.strip():
                cluster = json.loads(r.stdout.splitlines()[0])
                workers = cluster.get("workers", [])
                if (len(workers) == self.workers and
                        all(w.get("reachable") and w.get("profile") for w in workers) and
                        cluster.get("memstore_profile")):
                    return
            time.sleep(0.2)
        raise RuntimeError("the node's workers and memstore were not ready within %ss: %s\n%s" %
                           (timeout, cluster, self.output()))

    def output(self):
        with open(os.path.join(self.tmp, "lumend.out"), "rb") as f:
            out = f.read().decode(errors="replace")
        logs = os.path.join(self.data_dir, "logs")
        if os.path.isdir(logs):
            for name in sorted(os.listdir(logs)):
                with open(os.path.join(logs, name), "rb") as f:
                    out += "\n--- %s ---\n%s" % (name, f.read().decode(errors="replace")[-4000:])
        return out

    def stop(self, timeout=15):
        Node.running.discard(self)
        try:
            self._stop(timeout)
        finally:
            if not os.environ.get("LUMEN_KEEP_TEST_DIRS"):
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _stop(self, timeout):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def ctl(self, *args, check=True, timeout=300):
        cmd = [runfile("client/lumenctl"), "--socket", self.socket] + [str(a) for a in args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("lumenctl %s failed (%d):\n%s\n%s\n%s" % (
                " ".join(map(str, args)), r.returncode, r.stdout, r.stderr, self.output()))
        return r

    def ctl_json(self, *args):
        out = self.ctl(*args, "--json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def node_status(self):
        with open(os.path.join(self.data_dir, "node.json")) as f:
            return json.load(f)

    def process(self, name):
        for p in self.node_status()["processes"]:
            if p["name"] == name:
                return p
        raise KeyError(name)

    def metrics(self, name):
        """The lines of the Prometheus text that process `name` (node.json's) serves."""
        url = "http://%s/metrics" % self.process(name)["metrics_address"]
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode().splitlines()

    def nvme_bytes_written(self):
        """The bytes the memstore has written to its NVMe tier since it started."""
        return sum(float(line.split()[-1]) for line in self.metrics("memstore")
                   if line.startswith("lumen_memstore_io_bytes_total") and
                   'tier="nvme"' in line and 'direction="write"' in line)

    def submit(self, yaml_text, name="job.yaml"):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(yaml_text)
        out = self.ctl("submit", path, "--json").stdout
        return json.loads(out.splitlines()[0])

    def job(self, job_id):
        return self.ctl_json("status", job_id)[0]

    def wait_job(self, job_id, states=("SUCCEEDED", "FAILED", "CANCELLED"), timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError("job %s not in %s after %ss: %s\n%s" % (
            job_id, states, timeout, job, self.output()))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    return True


def report_hang():
    """What a test that is about to be killed at Bazel's timeout was doing: every Python
    thread's stack, and each running node's jobs, process logs and (where gdb is installed)
    its processes' threads."""
    sys.stderr.write("\n=== the test is about to time out; where it is:\n")
    faulthandler.dump_traceback(all_threads=True)
    for node in list(Node.running):
        try:
            jobs = node.ctl("jobs", check=False, timeout=5)
            sys.stderr.write("=== lumenctl jobs:\n%s%s\n" % (jobs.stdout, jobs.stderr))
        except subprocess.TimeoutExpired:
            sys.stderr.write("=== lumenctl jobs did not answer within 5 s\n")
        sys.stderr.write("=== node %s:\n%s\n" % (node.tmp, node.output()))
        if shutil.which("gdb"):
            try:
                processes = node.node_status()["processes"]
            except (OSError, ValueError, KeyError):
                processes = []
            for p in processes:
                if not p.get("pid") or not pid_alive(int(p["pid"])):
                    continue
                try:
                    bt = subprocess.run(["gdb", "-p", str(p["pid"]), "-batch", "-nx", "-ex",
                                         "thread apply all bt 15"], capture_output=True,
                                        text=True, timeout=15).stdout
                except subprocess.TimeoutExpired:
                    bt = "(gdb did not finish within 15 s)"
                threads = [t for t in bt.split("\nThread ") if " in " in t]
                # Idle pool threads are noise: keep those inside our code but not merely
                # waiting for work.
                ours = [t for t in threads if "lumen::" in t and "Executor::Loop" not in t]
                sys.stderr.write("=== %s (pid %s): %d of %d threads in lumen code:\nThread %s\n" % (
                    p["name"], p["pid"], len(ours), len(threads),
                    "\nThread ".join(ours)[-8000:]))
    sys.stderr.flush()


def main():
    # Bazel kills a test at its timeout without a word from it: report what it was waiting
    # for shortly before.
    timeout = int(os.environ.get("TEST_TIMEOUT", "0"))
    if timeout > 120:
        timer = threading.Timer(timeout - 60, report_hang)
        timer.daemon = True
        timer.start()
    unittest.main(argv=[sys.argv[0]], verbosity=2)
