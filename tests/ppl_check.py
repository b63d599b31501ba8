"""A quick perplexity check: our binary against Hugging Face transformers (float32) on the same text,
the same windows and the same scoring protocol.

    python3 tests/ppl_check.py MODEL_DIR TEXT_FILE [-c 512] [--binary ./run] [--dtype bf16] [--tokens N]

Exports MODEL_DIR (a Hugging Face folder with tokenizer.json) with export.py, runs `BINARY -m ppl`,
then scores the same windows with transformers (on the GPU if there is one), and prints both
perplexities, their relative difference and the tokens scored. Protocol (README, mode ppl): the
text's tokens in consecutive windows of -c tokens, each from an empty cache, token j > 0 of a window
scored given tokens 0..j-1 of it. Needs torch, transformers and tokenizers (the GPU machine has them).
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return r.stdout


def hf_nll(model_dir, text, context, tokens):
    """Summed -log p and the count over the windows, with transformers in float32."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gen_fixtures import nll_windows
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).encode(text).ids
    if tokens:
        ids = ids[:tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    windows = nll_windows(model.to(device).eval(), ids, context)
    return sum(n for n, _ in windows), sum(c for _, c in windows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("text")
    ap.add_argument("-c", "--context", type=int, default=512, help="window length in tokens")
    ap.add_argument("--binary", default=os.path.join(ROOT, "run"), help="./run (GPU, default) or ./runcpu")
    ap.add_argument("--dtype", default=None, help="export dtype (default: the model's own)")
    ap.add_argument("--tokens", type=int, default=0, help="score only the first N tokens of the text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_bin, tokenizer_bin = os.path.join(tmp, "model.bin"), os.path.join(tmp, "tokenizer.bin")
        export = [sys.executable, os.path.join(ROOT, "export.py")]
        sh(export + [args.model_dir, model_bin] + (["--dtype", args.dtype] if args.dtype else []))
        sh(export + ["--tokenizer", os.path.join(args.model_dir, "tokenizer.json"), tokenizer_bin])
        limit = ["-n", str(args.tokens)] if args.tokens else []
        fields = sh([args.binary, model_bin, "-m", "ppl", "-f", args.text, "-c", str(args.context),
                     "-z", tokenizer_bin, *limit]).split()
    ours, our_tokens = float(fields[3]), int(fields[5])
    text = open(args.text, encoding="utf-8").read()
    total, count = hf_nll(args.model_dir, text, args.context, args.tokens)
    hf = total / count
    print(f"{os.path.basename(args.binary)}: ppl {math.exp(ours):.6f} (nll {ours:.8f}), {our_tokens} tokens scored")
    print(f"transformers float32: ppl {math.exp(hf):.6f} (nll {hf:.8f}), {count} tokens scored")
    print(f"relative difference of the perplexities: {abs(math.exp(ours) - math.exp(hf)) / math.exp(hf):.2e}")
    if our_tokens != count:
        sys.exit(f"error: {our_tokens} tokens scored against HF's {count}: the tokenizations differ")


if __name__ == "__main__":
    main()
