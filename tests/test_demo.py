"""The trained demo model (demo/) on the CPU reference against Hugging Face float32 references
(tests/fixtures/demo_ref/, made by tests/gen_demo_refs.py on the GPU machine from the same weights):
the validation split's token ids, logits, perplexity of the whole validation split, greedy text.

Tolerances: logits within relative L2 1e-5 per position (float32 against float32 in another
summation order; the demo's logits are well conditioned, unlike the random fixtures'); perplexity
within 1e-6 relative; greedy tokens equal (HF's smallest top-2 gap over the 200 steps is 2.9e-3, far
above our error).
"""
import json
import os
import sys

import numpy as np

from harness import ROOT, RUNCPU, TMP, data_file, export, logits_of, run

sys.path.insert(0, os.path.join(ROOT, "demo"))
from text import split  # noqa: E402

REF_DIR = os.path.join(ROOT, "tests", "fixtures", "demo_ref")
REF = json.load(open(os.path.join(REF_DIR, "ref.json")))
DEMO_TOKENIZER = os.path.join(ROOT, "demo", "tokenizer.bin")
UNDER_ASAN = "asan" in RUNCPU


def demo_model():
    return export(os.path.join(ROOT, "demo"))


def validation_text():
    path = os.path.join(TMP, "demo_val.txt")
    if not os.path.exists(path):
        _, val = split(open(data_file("tinyshakespeare.txt"), encoding="utf-8").read())
        open(path, "w", encoding="utf-8").write(val)
    return path


def test_demo_tokenizer_on_the_validation_split():
    rc, out, err = run([RUNCPU, "-m", "tokenize", "-f", validation_text(), "-z", DEMO_TOKENIZER])
    assert rc == 0, err
    ours = np.array(out.split(), dtype=np.int32)
    hf = np.load(os.path.join(REF_DIR, "val_ids.npy"))
    assert len(ours) == len(hf) and np.array_equal(ours, hf), \
        f"{len(ours)} ids vs HF's {len(hf)}; first difference at {np.argmax(ours[:len(hf)] != hf[:len(ours)])}"


def test_demo_logits_match_hf():
    ids = np.load(os.path.join(REF_DIR, "val_ids.npy"))[:REF["context"]].tolist()
    ours, _ = logits_of(demo_model(), ids)
    ref = np.load(os.path.join(REF_DIR, "ref_logits.npy"))
    got = ours[REF["positions"]]
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"logits relative L2: max {rel.max():.2e}, median {np.median(rel):.2e} over {len(rel)} positions")
    assert rel.max() <= 1e-5, f"position {REF['positions'][rel.argmax()]}: relative L2 {rel.max():.2e}"
    assert np.array_equal(got.argmax(1), ref.argmax(1))


def test_demo_greedy_matches_hf():
    _, greedy = logits_of(demo_model(), REF["greedy_prompt"], greedy=len(REF["greedy"]))
    assert greedy == REF["greedy"], f"first difference at step {next(i for i, (a, b) in enumerate(zip(greedy, REF['greedy'])) if a != b)}"


def test_demo_perplexity_matches_hf():
    """The whole validation split in windows of 512 (the first 4 windows under ASan, which is ~5x
    slower), against HF's per-window sums."""
    windows = REF["ppl_windows"][:4] if UNDER_ASAN else REF["ppl_windows"]
    scored = sum(count for _, count in windows)
    hf_nll = sum(nll for nll, _ in windows) / scored
    args = ["-n", str(scored + len(windows))] if UNDER_ASAN else []
    rc, out, err = run([RUNCPU, demo_model(), "-m", "ppl", "-f", validation_text(), "-c", str(REF["context"]),
                        "-z", DEMO_TOKENIZER, *args], timeout=600)
    assert rc == 0, err
    fields = out.split()
    nll, tokens = float(fields[3]), int(fields[5])
    print(f"nll {nll:.8f} vs HF {hf_nll:.8f} ({abs(nll - hf_nll) / hf_nll:.1e}), {tokens} tokens; "
          f"HF's whole split: {REF['val_loss_per_token']:.4f} nats/token, {REF['val_loss_per_byte']:.4f} nats/byte")
    assert tokens == scored, f"{tokens} tokens scored, HF {scored}"
    assert abs(nll - hf_nll) <= 1e-6 * hf_nll, f"nll {nll} vs HF {hf_nll}"
