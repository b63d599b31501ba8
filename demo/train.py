"""Trains the demo model: a small Qwen3 (QK-norm, GQA 2:1, tied embeddings, RoPE theta 1e6) and its
own byte-level BPE tokenizer on tinyshakespeare, so that a first run prints real text.

Runs on the GPU machine (torch, transformers, tokenizers), seeded, in a few minutes:
    python3 demo/train.py TINYSHAKESPEARE_TXT OUT_DIR [NAME=VALUE ...]

(NAME=VALUE overrides one of the hyperparameters below, e.g. LR=1e-3, for a sweep.)

Writes OUT_DIR/config.json, model.safetensors (bf16) and tokenizer.json: a Hugging Face folder
that export.py reads like a real Qwen3 checkpoint. The text is split as demo/text.py's split() says:
the first 90% (cut at a line boundary) trains, the last 10% validates.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen3Config, Qwen3ForCausalLM

from text import split

SEED = 1337
BPE_VOCAB = 4093  # + the three special tokens = 4096 ids
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=5,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              bos_token_id=4093, eos_token_id=4093)  # <|endoftext|>
CONTEXT, BATCH, STEPS, WARMUP = 512, 64, 1000, 100
LR, MIN_LR, WEIGHT_DECAY, DROPOUT = 1e-3, 1e-4, 0.1, 0.3
EVAL_EVERY, EVAL_WINDOWS = 100, 64


def train_tokenizer(train_text):
    """Byte-level BPE with Qwen2/Qwen3's normalizer, pre-tokenizer and decoder; ids 0..255 are the
    bytes, merge r makes id 256 + r, the special tokens come last (as in Qwen's own file)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([train_text], trainer=trainer)
    tok.add_special_tokens(SPECIAL)
    assert tok.get_vocab_size() == CONFIG["vocab_size"], tok.get_vocab_size()
    return tok


def add_dropout(model, p):
    """Dropout on the embedding and on every attention and MLP output, in training only: the
    architecture run at inference is Qwen3's, unchanged."""
    def drop(module, args, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, module.training),) + out[1:]
        return F.dropout(out, p, module.training)
    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def main(text_path, out_dir):
    torch.manual_seed(SEED)
    torch.backends.cuda.matmul.allow_tf32 = True
    text = open(text_path, encoding="utf-8").read()
    train_text, val_text = split(text)
    tok = train_tokenizer(train_text)
    train = torch.tensor(tok.encode(train_text).ids, device="cuda")
    val = torch.tensor(tok.encode(val_text).ids, device="cuda")
    print(f"tokenizer: {tok.get_vocab_size()} ids; train {len(train_text)} bytes = {len(train)} tokens, "
          f"val {len(val_text.encode())} bytes = {len(val)} tokens", flush=True)

    model = Qwen3ForCausalLM(Qwen3Config(**CONFIG, attn_implementation="sdpa")).cuda()
    add_dropout(model, DROPOUT)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": other, "weight_decay": 0}],
                            lr=LR, betas=(0.9, 0.95), fused=True)
    g = torch.Generator(device="cuda").manual_seed(SEED)
    val_starts = torch.arange(EVAL_WINDOWS, device="cuda") * ((len(val) - CONTEXT - 1) // EVAL_WINDOWS)

    def batch(data, starts):
        idx = starts[:, None] + torch.arange(CONTEXT + 1, device="cuda")
        return data[idx]

    def loss_of(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    best, best_state, start = float("inf"), None, time.time()
    for step in range(STEPS + 1):
        if step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                v = loss_of(batch(val, val_starts)).item()
            model.train()
            if v < best:
                best, best_step = v, step
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            print(f"step {step}: val loss {v:.4f} (best {best:.4f} at {best_step}), {time.time() - start:.0f} s", flush=True)
        if step == STEPS:
            break
        lr = LR * min(1, (step + 1) / WARMUP)
        if step >= WARMUP:
            lr = MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - CONTEXT - 1, (BATCH,), device="cuda", generator=g)
        loss = loss_of(batch(train, starts))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.load_state_dict(best_state)
    os.makedirs(out_dir, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    summary = {"seed": SEED, "steps": STEPS, "best_step": best_step, "best_val_loss_sampled": best,
               "train_tokens": len(train), "val_tokens": len(val), "val_bytes": len(val_text.encode()),
               "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - start, 1)}
    json.dump(summary, open(os.path.join(out_dir, "train_log.json"), "w"), indent=1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    for arg in sys.argv[3:]:
        name, value = arg.split("=")
        globals()[name] = type(globals()[name])(value)
    main(*sys.argv[1:3])
