"""A job spec's resume_from continues another job's checkpoint: the new job trains the steps
after it with the losses the first job had (the same weights, AdamW moments, step counter,
batches and learning rates), for example to extend a finished run. A checkpoint at or past
train.steps, or a directory that is not a checkpoint, is refused at submit naming the field."""

import os
import unittest

import lumen_node


def spec(data, name, steps, extra=""):
    return lumen_node.job_yaml(data, name=name, steps=steps,
                               extra="checkpoint: {every_steps: 5}\n" + extra)


class ResumeTest(unittest.TestCase):
    def test_a_job_continues_another_jobs_checkpoint(self):
        with lumen_node.Node() as node:
            data = os.path.join(node.tmp, "train.bin")
            lumen_node.write_tokens(data, 30000)
            whole = node.submit(spec(data, "whole", 12))
            ended = node.wait_job(whole["id"])
            self.assertEqual(ended["state"], "SUCCEEDED")
            reference = node.ctl_json("logs", whole["id"])
            step5 = os.path.join(ended["output_dir"], "step-5")

            # Relative to the spec file, as every path of a spec.
            rel = os.path.relpath(step5, node.tmp)
            cont = node.submit(spec(data, "continued", 12, "resume_from: %s\n" % rel))
            self.assertEqual(cont["spec"]["resume_from"], step5)
            ended = node.wait_job(cont["id"])
            self.assertEqual(ended["state"], "SUCCEEDED", ended.get("failure_reason"))
            steps = node.ctl_json("logs", cont["id"])
            self.assertEqual([int(s["step"]) for s in steps], list(range(6, 13)))
            self.assertEqual([s["loss"] for s in steps], [s["loss"] for s in reference[5:]])
            self.assertEqual([s["lr"] for s in steps], [s["lr"] for s in reference[5:]])
            self.assertTrue(os.path.isdir(os.path.join(ended["output_dir"], "step-12")))

            # Nothing left to train: refused at submit, naming the field and the numbers.
            path = os.path.join(node.tmp, "done.yaml")
            with open(path, "w") as f:
                f.write(spec(data, "done", 5, "resume_from: %s\n" % step5))
            r = node.ctl("submit", path, check=False)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("resume_from: %s is step 5; train.steps 5 must be larger" % step5,
                          r.stderr)
            with open(path, "w") as f:
                f.write(spec(data, "notckpt", 5, "resume_from: %s\n" % node.tmp))
            r = node.ctl("submit", path, check=False)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("resume_from: %s is not a checkpoint directory" % node.tmp, r.stderr)


if __name__ == "__main__":
    lumen_node.main()
