"""Builds the committed test fixtures: tiny seeded random Qwen3/Qwen2 models saved by Hugging Face
`save_pretrained`, with Hugging Face float32 reference outputs beside them.

Runs where torch and transformers exist (the GPU machine, on its CPU):
    python3 tests/gen_fixtures.py OUTDIR TOKENIZER_DIR SHAKESPEARE_TXT

Each OUTDIR/<name>/ is a real Hugging Face model folder plus
    ref.json         config summary, ids, greedy prompt/continuation/margins, perplexity references
    ref_logits.npy   float32 (len(ids), vocab) logits of HF's forward pass over ref.json's "ids"
and OUTDIR/chat_ids.json holds chat prompts rendered by the tokenizer's own chat template.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

# name: (class, config, saved dtype, shard size, seed)
FIXTURES = {
    # GQA 2:1, head_dim 32 != dim/n_heads = 16, tied, bf16 source, planted k_norm outliers
    "qwen3_gqa2_bf16": (Qwen3ForCausalLM, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
        tie_word_embeddings=True), torch.bfloat16, None, 1),
    # MHA (ratio 1), untied, fp32 source, sharded with an index
    "qwen3_mha_untied_fp32_sharded": (Qwen3ForCausalLM, dict(hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=512,
        tie_word_embeddings=False), torch.float32, "60KB", 2),
    # GQA 4:1, head_dim 64, three layers, bf16
    "qwen3_gqa4_bf16": (Qwen3ForCausalLM, dict(hidden_size=128, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=512,
        tie_word_embeddings=True), torch.bfloat16, None, 3),
    # Qwen2.5-style: q/k/v bias, no QK-norm, GQA 7:1, head_dim = dim/n_heads = 16, tied, fp32
    "qwen2_gqa7_bias_fp32": (Qwen2ForCausalLM, dict(hidden_size=112, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1, vocab_size=512,
        tie_word_embeddings=True), torch.float32, None, 4),
    # the real 151,936-row vocabulary with a very small body: perplexity and CLI tests on real text
    "qwen3_fullvocab_bf16": (Qwen3ForCausalLM, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=151936,
        tie_word_embeddings=True), torch.bfloat16, None, 5),
}
COMMON = dict(max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6)
N_IDS, N_PROMPT, N_GREEDY, PPL_CTX, PPL_BYTES = 40, 6, 64, 64, 6000


def randomize(model, seed):
    """Weights that make peaked logits (so greedy paths have clear margins) and norm gains that
    are not all ones, with k_norm outliers like Qwen3-0.6B's (96.5 in layer 0, >20 in later layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        for i, layer in enumerate(model.model.layers):
            if hasattr(layer.self_attn, "k_norm"):
                w = layer.self_attn.k_norm.weight
                w.copy_(torch.rand(w.shape, generator=g) * 1.6 + 1.5)  # median near 2.3
                ch = torch.randperm(w.shape[0], generator=g)[:3]
                if i == 0:
                    w[ch] = 96.5
                elif i <= 7:
                    w[ch] = torch.tensor([42.0, 27.5, 21.0])


def nll_windows(model, ids, ctx):
    """The perplexity protocol of `run -m ppl`: consecutive windows of ctx tokens, no overlap, each
    started with an empty cache; inside a window, token j>0 is scored given tokens 0..j-1 of it.
    Returns (summed -log p, tokens scored) per window, on the model's device."""
    device = next(model.parameters()).device
    windows = []
    for s in range(0, len(ids), ctx):
        w = ids[s:s + ctx]
        if len(w) < 2:
            break
        with torch.no_grad():
            logits = model(torch.tensor([w], device=device)).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        windows.append((-lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item(), len(w) - 1))
    return windows


def main(out_dir, tok_dir, text_path):
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = open(text_path, encoding="utf-8").read()[:PPL_BYTES]
    for name, (cls, cfg, dtype, shard, seed) in FIXTURES.items():
        cfgcls = Qwen3Config if cls is Qwen3ForCausalLM else Qwen2Config
        config = cfgcls(**cfg, **COMMON, attn_implementation="eager")
        torch.manual_seed(seed)
        model = cls(config).float()
        randomize(model, seed)
        path = os.path.join(out_dir, name)
        kw = {"max_shard_size": shard} if shard else {}
        model.to(dtype).save_pretrained(path, **kw)
        # The reference runs in float32 on exactly the stored (possibly bf16-rounded) weights.
        model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        V = cfg["vocab_size"]
        g = torch.Generator().manual_seed(100 + seed)
        ref = {"vocab_size": V, "transformers": transformers.__version__, "torch": torch.__version__}
        if V <= 4096:
            ids = torch.randint(0, V, (N_IDS,), generator=g).tolist()
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            np.save(os.path.join(path, "ref_logits.npy"), logits)
            ref["ids"] = ids
            prompt = ids[:N_PROMPT]
        else:
            prompt = tok.encode("ROMEO:\nWhat light")
            ref["ppl_text_bytes"] = PPL_BYTES
            ref["ppl_ctx"] = PPL_CTX
            text_ids = tok.encode(text)
            ref["ppl_tokens_in_text"] = len(text_ids)
            windows = nll_windows(model, text_ids, PPL_CTX)
            nll, count = sum(n for n, _ in windows), sum(c for _, c in windows)
            ref["ppl_nll_sum"], ref["ppl_scored"] = nll, count
            ref["ppl"] = math.exp(nll / count)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=N_GREEDY, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None,
                             pad_token_id=0)
        margins = []
        for sc in out.scores:
            top2 = torch.topk(sc[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        ref["greedy_prompt"] = prompt
        ref["greedy"] = out.sequences[0, len(prompt):].tolist()
        ref["greedy_margins"] = margins
        json.dump(ref, open(os.path.join(path, "ref.json"), "w"))
        print(name, "params", sum(p.numel() for p in model.parameters()), "min margin", min(margins))

    chats = [
        ("user_hi_nothink", [{"role": "user", "content": "Hi"}], False),
        ("user_hi_think", [{"role": "user", "content": "Hi"}], True),
        ("system_user_nothink", [{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "Name a prime > 10.\nOnly digits."}], False),
        ("system_user_think", [{"role": "system", "content": "Be kind. 你好"},
                               {"role": "user", "content": "Tell me about <think> tags & émoji 👍🏽"}], True),
    ]
    rendered = []
    for name, msgs, think in chats:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=think)
        rendered.append({"name": name, "messages": msgs, "enable_thinking": think, "text": text,
                         "ids": tok.encode(text)})
    json.dump(rendered, open(os.path.join(out_dir, "chat_ids.json"), "w"), ensure_ascii=False, indent=1)
    print("chat cases", len(rendered))


if __name__ == "__main__":
    main(*sys.argv[1:4])
