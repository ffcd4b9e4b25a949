"""A GPU node end to end, on the CPU emulator of CUDA (tests/cuda_emu/README.md): lumend
--device cuda probes the CUDA worker, which admits and trains jobs through RunTask, resident
when the job fits the GPU budget and streamed through host memory when it does not (with its
master weights and moments in the memstore's NVMe tier too), streams step records and writes
checkpoints. The GPU machine of tests/gpu/check.sh has no gRPC, so
this is the only place the CUDA worker process runs before a real GPU node.

The worker's figures are seeded in the profile cache: measuring (4096-wide GEMMs) is beyond
the emulator."""

import json
import os
import shutil
import unittest

import lumen_node

SPEC = """name: {name}
model: {{preset: tiny, num_attention_heads: 2, num_key_value_heads: 1}}
data: {{path: {data}, token_dtype: uint16}}
train: {{steps: 4, seq_len: 64, micro_batch_size: 2, grad_accum_steps: 2, seed: 3}}
optimizer: {{lr: 3.0e-3, weight_decay: 0.1, grad_clip: 1.0}}
checkpoint: {{every_steps: 2}}
"""

# What cuda::MeasureDevice would report (the planner's inputs), made up.
PROFILE = {"bf16_gemm_flops": 1e12, "h2d_bytes_per_s": 1e10, "d2h_bytes_per_s": 1e10,
           "copy_bytes_per_s": 1e11}


def gpu_node(device_memory, workers=1, extra_args=()):
    # The emulator has as many GPUs as LUMEN_CUDA_EMU_DEVICES says (lumend's children inherit
    # it): one per worker.
    os.environ["LUMEN_CUDA_EMU_DEVICES"] = str(workers)
    node = lumen_node.Node(workers=workers, device_memory=device_memory,
                           extra_args=["--device", "cuda"] + list(extra_args))
    bins = os.path.join(node.tmp, "bin")
    os.makedirs(bins)
    os.symlink(lumen_node.runfile("worker/worker_cuda_emu"), os.path.join(bins, "worker_cuda"))
    os.makedirs(os.path.join(node.data_dir, "profile"))
    for i in range(workers):
        with open(os.path.join(node.data_dir, "profile", "worker-%d.json" % i), "w") as f:
            json.dump(PROFILE, f)
    return node


def train(device_memory, name, nvme=False, overlap=False):
    """With `nvme`, a streamed job keeps its master weights and AdamW moments in the
    memstore's NVMe tier (--optimizer-state-tier nvme): checks they went through the drive and
    were freed with the job. With `overlap`, it updates during the backward into a second
    generation (--optimizer-overlap backward; the spec clips)."""
    nvme_dir = "/tmp/lumen-cuda-nvme-%d" % os.getpid()
    extra = ["--nvme-dir", nvme_dir, "--optimizer-state-tier", "nvme"] if nvme else []
    if overlap:
        extra += ["--optimizer-overlap", "backward"]
    node = gpu_node(device_memory, extra_args=extra)
    node.start(timeout=60)
    try:
        data = os.path.join(node.tmp, "train.bin")
        lumen_node.write_tokens(data, 30000)
        job = node.submit(SPEC.format(name=name, data=data))
        # The node's precision: the spec leaves it out, and GPU workers train in bf16.
        resources = job["spec"]["resources"]
        assert resources["precision"] == "PRECISION_BF16", resources
        ended = node.wait_job(job["id"], timeout=300)
        assert ended["state"] == "SUCCEEDED", ended["failure_reason"] + node.output()
        cluster = node.ctl_json("cluster")[0]
        steps = node.ctl_json("logs", job["id"])
        ckpts = sorted(os.listdir(ended["output_dir"]))
        files = set(os.listdir(os.path.join(ended["output_dir"], "step-4")))
        if nvme:
            assert node.nvme_bytes_written() > 0, node.metrics("memstore")
            held = sum(int(t.get("used_bytes", 0)) for t in cluster["tiers"])
            assert held == 0, cluster  # freed after the job
        return cluster, steps, ckpts, files
    finally:
        node.stop()
        shutil.rmtree(nvme_dir, ignore_errors=True)


class CudaNodeTest(unittest.TestCase):
    def test_a_model_the_kernels_cannot_run_is_refused_at_submit(self):
        node = gpu_node("512MiB")
        node.start(timeout=60)
        try:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            path = os.path.join(node.tmp, "tiny.yaml")
            with open(path, "w") as f:  # the tiny preset: 4 heads of 16
                f.write(SPEC.format(name="tiny", data=data).replace(
                    ", num_attention_heads: 2, num_key_value_heads: 1", ""))
            r = node.ctl("submit", path, check=False)
            self.assertNotEqual(r.returncode, 0, r.stdout)
            self.assertIn("head_dim 16", r.stderr)
            self.assertIn("num_attention_heads", r.stderr)
            # fp32 is the CPU device's precision: asked for here, it is refused, not ignored.
            with open(path, "w") as f:
                f.write(SPEC.format(name="fp32", data=data) + "resources: {precision: fp32}\n")
            r = node.ctl("submit", path, check=False)
            self.assertNotEqual(r.returncode, 0, r.stdout)
            self.assertIn("resources.precision: fp32: this node's workers are cuda", r.stderr)
            self.assertEqual(node.ctl_json("jobs"), [])
        finally:
            node.stop()

    def test_resident_and_streamed_jobs_train_alike(self):
        cluster, resident, ckpts, files = train("512MiB", "resident")
        self.assertIn("CUDA emulator", json.dumps(cluster["workers"][0]))
        self.assertEqual([int(s["step"]) for s in resident], [1, 2, 3, 4])
        self.assertIn("step-2", ckpts)
        self.assertIn("step-4", ckpts)
        self.assertTrue({"model.safetensors", "optimizer.safetensors", "config.json"} <= files,
                        files)
        for s in resident:
            self.assertGreater(s["loss"], 0)
            self.assertGreater(float(s["tokens_per_s"]), 0)
            self.assertLessEqual(int(s["device_memory_peak_bytes"]),
                                 int(s["device_memory_budget_bytes"]))

        # 34 MiB: above the streamed footprint (33.2 MiB with cuBLASLt's 32 MiB workspace),
        # below the resident one (34.8 MiB): admission streams the job.
        _, streamed, _, _ = train("34MiB", "streamed")
        self.assertEqual(len(streamed), 4)
        for r, s in zip(resident, streamed):
            self.assertAlmostEqual(s["loss"], r["loss"], delta=0.02 * r["loss"])
        for s in streamed:
            self.assertGreater(int(s["bytes_moved"]["host->device"]), 0, s)
            self.assertLessEqual(int(s["device_memory_peak_bytes"]), 34 << 20)

        # The master weights and moments in the memstore's NVMe tier, streamed a chunk at a
        # time through each update: the same training (the same bf16 math and order).
        _, on_nvme, _, files = train("34MiB", "streamed-nvme", nvme=True)
        self.assertIn("optimizer.safetensors", files)
        for r, s in zip(streamed, on_nvme):
            self.assertAlmostEqual(s["loss"], r["loss"], delta=1e-3 * r["loss"])
        # Updating during the backward, both generations in the memstore: the same again.
        _, overlapped, _, _ = train("34MiB", "streamed-nvme-overlap", nvme=True, overlap=True)
        for r, s in zip(streamed, overlapped):
            self.assertAlmostEqual(s["loss"], r["loss"], delta=1e-3 * r["loss"])
        # The update made during the backward was kept exactly when the step needed no
        # clipping (grad_clip 1.0); without --optimizer-overlap backward it waits for the norm.
        for s in overlapped:
            self.assertEqual(bool(s.get("optimizer_overlapped", False)),
                             float(s["grad_norm"]) + 1e-6 <= 1.0, s)
        self.assertFalse(any(s.get("optimizer_overlapped", False) for s in on_nvme), on_nvme)

    def test_a_job_on_two_gpus_trains_as_on_one(self):
        """resources.workers: 2 on a GPU node: a resident replica on each GPU, gradients summed
        through the host and the memstore; the losses are the 1-GPU job's."""
        node = gpu_node("512MiB", workers=2)
        node.start(timeout=60)
        try:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            spec = SPEC.replace("grad_accum_steps: 2", "grad_accum_steps: 4")
            pair = node.submit(spec.format(name="pair", data=data) + "resources: {workers: 2}\n",
                               name="pair.yaml")
            one = node.submit(spec.format(name="one", data=data), name="one.yaml")
            ended = [node.wait_job(j["id"], timeout=300) for j in (pair, one)]
            for job in ended:
                self.assertEqual(job["state"], "SUCCEEDED",
                                 job.get("failure_reason", "") + node.output())
            self.assertEqual(ended[0]["worker"], "worker-0,worker-1")
            steps = [node.ctl_json("logs", j["id"]) for j in (pair, one)]
            self.assertEqual([int(s["step"]) for s in steps[0]], [1, 2, 3, 4])
            for a, b in zip(*steps):
                self.assertEqual(a["tokens"], b["tokens"])  # the whole step's: 4 x 2 x 64
                # bf16 either way; the sums are added in another order.
                self.assertAlmostEqual(a["loss"], b["loss"], delta=1e-3 * b["loss"])
            self.assertIn("step-4", os.listdir(ended[0]["output_dir"]))
            # The replicas' exchange was freed with the job.
            cluster = node.ctl_json("cluster")[0]
            held = sum(int(t.get("used_bytes", 0)) for t in cluster["tiers"])
            self.assertEqual(held, 0, cluster)
        finally:
            node.stop()
            os.environ["LUMEN_CUDA_EMU_DEVICES"] = "1"


if __name__ == "__main__":
    unittest.main()
