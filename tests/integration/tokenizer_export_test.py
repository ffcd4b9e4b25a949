"""A SentencePiece token file made by `lumenctl data prepare --train-spm` trains on a real node;
its checkpoints carry the tokenizer (tokenizer.model, tokenizer_config.json,
lumen_tokenizer.json); `lumenctl export` copies a checkpoint and `lumenctl generate` samples
from the copy."""

import json
import os
import random
import unittest

import lumen_node

WORDS = ("And the LORD said unto Moses behold land of Egypt thou shalt not go people Israel "
         "came day night water bread, king; city: house.").split()


def write_text(path, lines=1500, seed=3):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n")


class TokenizerExportTest(unittest.TestCase):
    def test_spm_job_export_and_generate(self):
        with lumen_node.Node() as node:
            text = os.path.join(node.tmp, "text.txt")
            write_text(text)
            data = os.path.join(node.tmp, "train.bin")
            r = node.ctl("data", "prepare", "--input", text, "--out", data, "--train-spm", 320)
            self.assertIn("uint16, vocab 320", r.stdout)
            with open(data + ".tokenizer.json") as f:
                sidecar = json.load(f)
            self.assertEqual(sidecar["type"], "spm")
            self.assertEqual(sidecar["model"], os.path.abspath(data + ".spm.model"))

            job = node.submit(lumen_node.job_yaml(
                data, steps=4, seq_len=32, batch=2,
                extra="checkpoint: {every_steps: 2}\n").replace(
                    "model: {preset: tiny}", "model: {preset: tiny, vocab_size: 320}"))
            done = node.wait_job(job["id"])
            self.assertEqual(done["state"], "SUCCEEDED", done)
            step4 = os.path.join(done["output_dir"], "step-4")
            for name in ("tokenizer.model", "tokenizer_config.json", "lumen_tokenizer.json"):
                self.assertTrue(os.path.exists(os.path.join(step4, name)), name)
            with open(os.path.join(step4, "lumen_tokenizer.json")) as f:
                self.assertEqual(json.load(f)["model"], "tokenizer.model")
            with open(os.path.join(step4, "tokenizer_config.json")) as f:
                config = json.load(f)
            self.assertEqual(config["tokenizer_class"], "LlamaTokenizer")
            self.assertFalse(config["add_bos_token"])

            out = os.path.join(node.tmp, "exported")
            r = node.ctl("export", job["id"], "--step", 3, "--out", out, check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("available steps: 2, 4", r.stderr)
            self.assertFalse(os.path.exists(out))

            r = node.ctl("export", job["id"], "--out", out)
            self.assertIn("step-4", r.stdout)
            self.assertEqual(sorted(os.listdir(out)), sorted(os.listdir(step4)))
            r = node.ctl("export", job["id"], "--out", out, check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("not an empty directory", r.stderr)

            r = node.ctl("generate", "--checkpoint", out, "--prompt", "And the LORD said unto",
                         "--max-tokens", 20)
            self.assertTrue(r.stdout.startswith("And the LORD said unto"), r.stdout)
            self.assertGreater(len(r.stdout.split()), 5)


if __name__ == "__main__":
    lumen_node.main()
