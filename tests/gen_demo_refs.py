"""Hugging Face float32 references for the trained demo model (demo/), for the CPU tests in CI and
the GPU parity script. Runs on the GPU machine (torch, transformers, tokenizers):
    python3 tests/gen_demo_refs.py DEMO_DIR TINYSHAKESPEARE_TXT OUT_DIR

Writes OUT_DIR/ref.json, val_ids.npy (int32: HF's ids of the validation split) and ref_logits.npy
(float32 (len(positions), vocab): HF's logits over the first CONTEXT validation tokens, at
ref.json's "positions").
"""
import json
import math
import os
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer
from transformers import Qwen3ForCausalLM

here = os.path.dirname(os.path.abspath(__file__))

sys.path[:0] = [here, os.path.join(here, ".."), os.path.join(here, "..", "demo")]
from export import bytes_to_unicode  # noqa: E402
from gen_fixtures import nll_windows  # noqa: E402
from text import split  # noqa: E402

CONTEXT, LOGITS_EVERY, N_GREEDY, PROMPT = 512, 8, 200, "ROMEO:"


def main(demo_dir, text_path, out_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_grad_enabled(False)
    os.makedirs(out_dir, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(demo_dir, "tokenizer.json"))
    _, val_text = split(open(text_path, encoding="utf-8").read())
    val = tok.encode(val_text).ids
    np.save(os.path.join(out_dir, "val_ids.npy"), np.array(val, dtype=np.int32))
    model = Qwen3ForCausalLM.from_pretrained(demo_dir, dtype=torch.float32, attn_implementation="eager").cuda().eval()

    # logits over the first CONTEXT validation tokens, every LOGITS_EVERY-th position (and the last)
    window = val[:CONTEXT]
    positions = list(range(0, CONTEXT, LOGITS_EVERY)) + [CONTEXT - 1]
    logits = model(torch.tensor([window]).cuda()).logits[0].float().cpu().numpy()
    np.save(os.path.join(out_dir, "ref_logits.npy"), logits[positions])

    # perplexity of the whole validation split, run's protocol: (nll sum, tokens scored) per window
    windows = nll_windows(model, val, CONTEXT)
    nll = sum(n for n, _ in windows)
    scored = sum(c for _, c in windows)
    # bytes of the scored tokens (every token but the first of each window), for nats per byte
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    scored_bytes = sum(len(bytes(byte_of[ch] for ch in tok.id_to_token(t)))
                       for s in range(0, len(val), CONTEXT) for t in val[s + 1:s + CONTEXT])

    prompt = tok.encode(PROMPT).ids
    out = model.generate(torch.tensor([prompt]).cuda(), max_new_tokens=N_GREEDY, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    margins = [float(torch.topk(sc[0].float(), 2).values.diff().abs()) for sc in out.scores]
    ref = {"transformers": transformers.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
           "context": CONTEXT, "positions": positions, "val_tokens": len(val), "val_bytes": len(val_text.encode()),
           "ppl_windows": windows, "ppl_nll_sum": nll, "ppl_scored": scored, "ppl_scored_bytes": scored_bytes,
           "val_loss_per_token": nll / scored, "val_ppl_per_token": math.exp(nll / scored),
           "val_loss_per_byte": nll / scored_bytes, "val_ppl_per_byte": math.exp(nll / scored_bytes),
           "greedy_prompt_text": PROMPT, "greedy_prompt": prompt, "greedy": out.sequences[0, len(prompt):].tolist(),
           "greedy_margins": margins, "greedy_text": tok.decode(out.sequences[0].tolist())}
    json.dump(ref, open(os.path.join(out_dir, "ref.json"), "w"), indent=1)
    print({k: v for k, v in ref.items() if k not in ("ppl_windows", "greedy", "greedy_margins", "greedy_prompt")})
    print("smallest greedy margin", min(margins))


if __name__ == "__main__":
    main(*sys.argv[1:4])
