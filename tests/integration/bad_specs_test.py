"""Malformed job specs are each rejected at submit with a message naming the field at fault, and
the node keeps serving."""

import os
import unittest

import lumen_node

GOOD_MODEL = "model: {preset: tiny}\n"
GOOD_TRAIN = "train: {steps: 2, seq_len: 16, micro_batch_size: 2}\n"
GOOD_OPT = "optimizer: {lr: 1.0e-3}\n"


def spec(model=GOOD_MODEL, data=None, train=GOOD_TRAIN, opt=GOOD_OPT, extra=""):
    return model + data + train + opt + extra


class BadSpecsTest(unittest.TestCase):
    def test_each_malformed_spec_names_its_field(self):
        with lumen_node.Node() as node:
            good = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(good, 5000)
            odd = os.path.join(node.tmp, "odd.bin")
            with open(odd, "wb") as f:
                f.write(b"12345")
            big = os.path.join(node.tmp, "big.bin")
            with open(big, "wb") as f:
                f.write(b"\xff\xff" * 100)
            data = "data: {path: %s, token_dtype: uint16}\n" % good
            cases = [
                ("name: [unclosed\n", "invalid YAML"),
                ("- just\n- a list\n", "expected a mapping"),
                (spec(data=data, extra="colour: blue\n"), "colour"),
                (spec(model="model: {preset: tiny, hidden_sise: 64}\n", data=data),
                 "model.hidden_sise"),
                (spec(data=data, train="train: {steps: many, seq_len: 16, micro_batch_size: 2}\n"),
                 "train.steps"),
                (spec(data=data, train="train: {steps: -3, seq_len: 16, micro_batch_size: 2}\n"),
                 "train.steps: -3"),
                (spec(data=data, train="train: {steps: 2, seq_len: 0, micro_batch_size: 2}\n"),
                 "train.seq_len"),
                (spec(data=data, train="train: {steps: 2, seq_len: 16, micro_batch_size: -1}\n"),
                 "train.micro_batch_size"),
                (spec(data=data, train="train: {steps: 2, seq_len: 16, micro_batch_size: 2, "
                      "grad_accum_steps: -2}\n"), "train.grad_accum_steps"),
                (spec(model="model: {preset: tiny, num_attention_heads: 3}\n", data=data),
                 "model.num_attention_heads: 3 does not divide model.hidden_size 64"),
                (spec(model="model: {preset: tiny, num_key_value_heads: 3}\n", data=data),
                 "model.num_key_value_heads: 3 does not divide model.num_attention_heads 4"),
                (spec(model="model: {preset: gigantic}\n", data=data), "model.preset"),
                (spec(model="model: {hidden_size: 64}\n", data=data), "model.intermediate_size"),
                (spec(model="model: {preset: tiny, vocab_size: 0}\n", data=data),
                 "model.vocab_size"),
                (spec(model="model: {preset: tiny, rope_theta: -1}\n", data=data),
                 "model.rope_theta"),
                (spec(data="data: {path: %s/missing.bin, token_dtype: uint16}\n" % node.tmp),
                 "data.path"),
                (spec(data="data: {path: %s}\n" % good), "data.token_dtype: is required"),
                (spec(data="data: {path: %s, token_dtype: uint16}\n" % odd), "data.token_dtype"),
                (spec(data="data: {path: %s, token_dtype: uint32}\n" % good)
                 if os.path.getsize(good) % 4 else
                 spec(data="data: {path: %s, token_dtype: int8}\n" % good), "data.token_dtype"),
                (spec(data="data: {path: %s, token_dtype: uint16}\n" % big), "model.vocab_size"),
                (spec(data="data: {path: %s, token_dtype: uint16, order: random}\n" % good),
                 "data.order"),
                (spec(data=data, opt="optimizer: {lr: 0}\n"), "optimizer.lr"),
                (spec(data=data, opt="optimizer: {lr: 0.1, betas: [0.9, 2]}\n"),
                 "optimizer.betas[1]"),
                (spec(data=data, opt="optimizer: {lr: 0.1, weight_decay: -0.1}\n"),
                 "optimizer.weight_decay"),
                (spec(data=data, opt="optimizer: {lr: 0.1, schedule: {kind: linear}}\n"),
                 "optimizer.schedule.kind"),
                (spec(data=data, opt="optimizer: {lr: 0.1, schedule: {kind: cosine, "
                      "min_lr: 1.0}}\n"), "optimizer.schedule.min_lr"),
                (spec(data=data, extra="checkpoint: {every_steps: -5}\n"),
                 "checkpoint.every_steps"),
                (spec(data=data, extra="resources: {workers: 4}\n"), "resources.workers"),
                (spec(data=data, extra="resources: {precision: bf16}\n"), "resources.precision"),
                (spec(data=data, extra="init_from: /nonexistent/model.safetensors\n"),
                 "init_from"),
            ]
            self.assertGreaterEqual(len(cases), 20)
            for i, (text, fragment) in enumerate(cases):
                path = os.path.join(node.tmp, "bad%d.yaml" % i)
                with open(path, "w") as f:
                    f.write(text)
                r = node.ctl("submit", path, check=False)
                self.assertEqual(r.returncode, 2, "case %d accepted:\n%s\n%s" % (i, text, r.stdout))
                self.assertIn(fragment, r.stderr, "case %d:\n%s" % (i, text))
            self.assertEqual(node.ctl_json("jobs"), [])
            job = node.submit(spec(data=data))
            end = node.wait_job(job["id"])
            self.assertEqual(end["state"], "SUCCEEDED", node.output())
            # The planner predicted the job's step time on the node's measured figures; every
            # step record carries the prediction beside the measurement.
            predicted = float(end.get("predicted_step_time_s", 0))
            self.assertGreater(predicted, 0, node.output())
            for step in node.ctl_json("logs", job["id"]):
                self.assertEqual(float(step["predicted_step_time_s"]), predicted)
            # The node measured its hardware (cached in the data dir) and reports it.
            cluster = node.ctl_json("cluster")[0]
            self.assertGreater(cluster["workers"][0]["profile"]["fp32_gemm_flops"], 1e9)
            self.assertGreater(cluster["memstore_profile"]["host_copy_bytes_per_s"], 1e8)
            self.assertGreater(cluster["memstore_profile"]["optimizer_params_per_s"], 1e6)
            self.assertTrue(os.path.exists(os.path.join(node.data_dir, "profile", "worker-0.json")))

    def test_job_that_cannot_fit_the_node_is_refused_at_submit(self):
        # 16 MiB of device memory and 64 MiB of memstore host memory: a micro-batch whose layer
        # alone needs more than the device has, and a model whose offloaded state needs more
        # than the memstore has, are both refused with the numbers; nothing is queued.
        with lumen_node.Node(device_memory="16MiB") as node:
            good = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(good, 5000)
            data = "data: {path: %s, token_dtype: uint16}\n" % good
            cases = [
                (spec(data=data, train="train: {steps: 2, seq_len: 256, micro_batch_size: 64}\n"),
                 ["does not fit this node", "backward of layer", "worker-0's budget is 16.00 MiB"]),
                (spec(model="model: {preset: tiny, hidden_size: 256, intermediate_size: 688, "
                      "num_hidden_layers: 8}\n", data=data),
                 ["does not fit this node", "of the memstore's host memory", "--host-memory"]),
            ]
            for i, (text, fragments) in enumerate(cases):
                path = os.path.join(node.tmp, "big%d.yaml" % i)
                with open(path, "w") as f:
                    f.write(text)
                r = node.ctl("submit", path, check=False)
                self.assertEqual(r.returncode, 1, "case %d accepted:\n%s\n%s" % (i, text, r.stdout))
                for fragment in fragments:
                    self.assertIn(fragment, r.stderr, "case %d" % i)
            self.assertEqual(node.ctl_json("jobs"), [])
            job = node.submit(spec(data=data))
            self.assertEqual(node.wait_job(job["id"])["state"], "SUCCEEDED", node.output())


if __name__ == "__main__":
    lumen_node.main()
