"""A real Prometheus (Debian's) scrapes a node through the file_sd file lumend writes, using the
scrape config in deploy/prometheus/, while a job runs: every daemon's metrics arrive and every
PromQL expression of the Grafana dashboard returns data."""

import json
import os
import shutil
import socket
import subprocess
import time
import unittest
import urllib.parse
import urllib.request

import lumen_node

PROMETHEUS = "/usr/bin/prometheus"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusTest(unittest.TestCase):
    def query(self, port, expr):
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (port, urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        self.assertEqual(body["status"], "success", expr)
        return body["data"]["result"]

    def test_dashboard_queries_return_data(self):
        if not os.path.exists(PROMETHEUS):
            print("SKIPPED: %s is not installed (tools/setup installs Debian's prometheus)"
                  % PROMETHEUS)
            self.skipTest("no prometheus")
        deploy = os.path.join(os.path.dirname(lumen_node.runfile("deploy/prometheus/prometheus.yml")))
        with open(os.path.join(deploy, "prometheus.yml")) as f:
            config = f.read()
        with open(lumen_node.runfile("deploy/grafana/dashboards/lumen.json")) as f:
            dashboard = json.load(f)
        with lumen_node.Node(workers=2) as node:
            targets = os.path.join(node.data_dir, "prometheus_targets.json")
            self.assertIn("/var/lib/lumen/prometheus_targets.json", config)
            config = config.replace("/var/lib/lumen/prometheus_targets.json", targets)
            config = config.replace("scrape_interval: 5s", "scrape_interval: 1s")
            config = config.replace("refresh_interval: 5s", "refresh_interval: 1s")
            config_path = os.path.join(node.tmp, "prometheus.yml")
            with open(config_path, "w") as f:
                f.write(config)
            port = free_port()
            prom_log = open(os.path.join(node.tmp, "prometheus.log"), "w")
            prom = subprocess.Popen(
                [PROMETHEUS, "--config.file", config_path, "--web.listen-address",
                 "127.0.0.1:%d" % port, "--storage.tsdb.path", os.path.join(node.tmp, "tsdb")],
                stdout=prom_log, stderr=subprocess.STDOUT)
            try:
                data = os.path.join(node.tmp, "train.bin")
                lumen_node.write_tokens(data, 40000)
                job = node.submit(lumen_node.job_yaml(data, steps=100000))
                node.wait_job(job["id"], states=("RUNNING",))
                node.ctl("cluster")  # exercises the memstore's and workers' RPCs
                expected = {"lumend", "coordinator", "memstore", "worker-0", "worker-1"}
                deadline = time.time() + 60
                seen = set()
                while time.time() < deadline:
                    try:
                        seen = {r["metric"].get("process") for r in
                                self.query(port, 'up{job="lumen"} == 1')}
                    except OSError:
                        seen = set()
                    if seen >= expected:
                        break
                    time.sleep(0.5)
                self.assertTrue(expected <= seen, "scraped: %s" % seen)
                # Each daemon's own metrics, by process label. (A worker serves its metrics
                # while it measures its device at the node's first start, and its service's
                # gauges once it is ready.)
                for process, metric in [("lumend", "lumen_process_up"),
                                        ("coordinator", "lumen_jobs"),
                                        ("memstore", "lumen_memstore_capacity_bytes"),
                                        ("worker-0", "lumen_worker_busy"),
                                        ("worker-1", "lumen_worker_device_memory_budget_bytes")]:
                    expr = '%s{process="%s"}' % (metric, process)
                    deadline = time.time() + 60
                    while not self.query(port, expr) and time.time() < deadline:
                        time.sleep(0.5)
                    self.assertTrue(self.query(port, expr), "%s from %s" % (metric, process))
                # rate() needs two samples of the running job in its window, and some gauges
                # appear only after the job's first steps: on a loaded machine that takes a
                # while, so wait for each query instead of sleeping a fixed time.
                exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
                self.assertGreaterEqual(len(exprs), 10)
                deadline = time.time() + 90
                empty = exprs
                while True:
                    node.ctl("cluster")
                    empty = [e for e in empty if not self.query(port, e)]
                    if not empty or time.time() > deadline:
                        break
                    time.sleep(1)
                self.assertEqual(empty, [], "dashboard queries without data after 90 s")
                node.ctl("cancel", job["id"])
            finally:
                prom.terminate()
                prom.wait(10)


if __name__ == "__main__":
    lumen_node.main()
