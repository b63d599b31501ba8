"""GPU parity: ./run against Hugging Face transformers (float32), and against ./runcpu.

Runs on the GPU machine (torch + transformers), from the repo root, after `make run runcpu`:
    python3 tests/gpu_parity.py WORKDIR TEXT_FILE TOKENIZER_DIR     (PARITY_ONLY=demo,stress,...: those parts)
TEXT_FILE is tinyshakespeare.txt and TOKENIZER_DIR holds Qwen3's tokenizer.json and
tokenizer_config.json (tests/gpu.sh decompresses both from data/). Prints one table; exits non-zero
on any failure. A part that raises (a crash of ./run, say) is a failed row, and the others still run.

Notation: u is the unit roundoff of the KV-cache type, 2^-8 for bf16 (8-bit significand) and 2^-11
for fp16 (11-bit); "rel L2" is ||logits - ref|| / ||ref|| at one position; rms is the root mean
square of the reference logits at that position.

1. Fixtures (tests/fixtures, the committed tiny models): `./run -m logits` against HF's float32 logits
   and ./runcpu's, greedy tokens against HF's, with the tolerances of part 2. `./run -m ppl` on the
   full-vocabulary fixture, both KV types: within 0.1% of HF's float32 nll, and within 1e-5 of the
   float64 log-softmax of ./run's own logits on the same windows (the cross-entropy kernel and the
   windowing).

2. Random models of the real shapes (seeded random weights, peaked logits, saved in bf16 so that HF's
   float32 reference and our files hold the same weights):
     qwen3-0.6b       the real Qwen3-0.6B config (28 layers, 1024/3072, 16:8 heads, hd 128, tied)
     qwen3-4b-4l      the Qwen3-4B shape with 4 layers (2560/9728, 32:8 heads: GQA 4:1)
     qwen2.5-0.5b-4l  the Qwen2.5-0.5B shape with 4 layers (896/4864, 14:2 heads, hd 64, bias)
     stress           qwen3-0.6b's shape, 4 layers, k_norm gains x1000: unscaled (-K 0), fp16 K is inf
                      and ./run must stop with its non-finite error in logits and in ppl mode
     qwen3-0.6b-4l-plain  qwen3-0.6b's shape, 4 layers, no k_norm outliers (for part 4, and the long
                      prompt: 5000 tokens, prefilled in two passes (run.c's PREFILL_CHUNK, 4096),
                      bf16, against HF float32 at every position with part 2's bounds)
   The Qwen3 ones but the last carry k_norm outliers as Qwen3-0.6B has them (96.5 in layer 0, 21-42
   in layers 1-7). Per KV type X, the worst rel L2 must stay within max(base[X], HF's own error
   running the same weights in the coarsest 16-bit format of the run: bf16 if the weights or the
   cache are bf16, since prefill rounds activations to the weights' type; bf16 where HF's fp16
   overflows, as on the stress model), base = 2e-2 for bf16 and 4e-3 for fp16. Where k_norm gains
   are large, scores reach the hundreds and a 16-bit rounding of q or K moves them by whole units:
   HF's own 16-bit run shows the same error, and that is the yardstick. Top-1 must agree with HF
   wherever HF's top-1/top-2 gap exceeds 6 x the allowed error x rms; greedy continuations must
   agree up to the first step whose HF gap is under 6 x base x rms.

3. The trained demo model (demo/: Qwen3, vocab 4096, 5 layers; HF float32 references made by
   tests/gen_demo_refs.py in tests/fixtures/demo_ref). Exported with bf16 and with fp16 weights, run
   with a bf16 and an fp16 KV cache, decoded by the persistent kernel ("fused", -a 1) and by the
   chain of kernels ("unfused", -a 0):
   - logits of the first 512 validation tokens (prefill) at ref.json's positions, and of the greedy
     continuation (decode) wherever its tokens equal HF's, against HF float32 (computed live on the
     same tokens; the live fp32 logits must equal the committed ones to 1e-4): rel L2 within 1e-2
     (bf16) / 2e-3 (fp16) for the coarsest 16-bit format of the run, or within HF's own error in
     that format (HF run live in bf16 or fp16 on the same weights) where that is larger; the table
     says which bound applied.
   - perplexity of the whole validation split (`./run -m ppl -c 512 -z demo/tokenizer.bin`, the text
     cut by demo/text.py's split()) within 0.1% of HF float32's, over the same number of scored
     tokens (so our tokenizer gave HF's ids).
   - 200 greedy tokens from ref.json's prompt equal to HF float32's up to their first difference,
     and that difference (if any) at a step whose HF top-2 gap (ref.json's greedy_margins) is under
     the run's noise there, 6 x its bound x rms.

   Generate mode, greedy (the demo and qwen3-0.6b, bf16): the persistent decode kernel enqueues each
   step before the host has read the token of the step before (the GPU's argmax feeds it); its
   tokens must equal those of logits mode (one step at a time, the host feeding each token) on the
   same prompt ids, bit for bit: the same kernel computes both.

4. Tight: ./run with fp32 weights against ./runcpu (float32 throughout) on the same file, per
   position: the fed tokens (prefill) and 64 greedy steps (decode, persistent kernel and chain), both
   KV types. With fp32 weights the GPU's products run in fp32 on the CUDA cores, so the two programs
   differ by summation order (relative ~1e-6) and by 16-bit roundings inside attention only. Each
   rounding perturbs one value by a relative error of at most u, of mean zero and rms u/sqrt(3) (a
   rounding to nearest of a value whose low bits are uniform), independently of the others: K and V
   when stored to the cache (decode: r = 2 roundings per layer); in prefill also q and the softmax
   weights P, the inputs of the tensor-core products (r = 4; r = 3 for a head_dim other than 64 and
   128, whose kernel keeps P in fp32). V and P enter the attention output as a convex combination, so
   they move it by their own relative error. Rounding q or K moves a score s = scale sum_i q_i k_i by
   u/sqrt(3) x scale x sqrt(sum_i (q_i k_i)^2), about u/sqrt(3) where the products q_i k_i are of
   order one (|s| of order sqrt(head_dim) or less), and the softmax passes a score error on to the
   output about 1:1. The attention output is one term of the residual stream and RMSNorm keeps
   relative errors, so each layer adds about sqrt(r/3) u to the relative error of the logits,
   independently of the others: sqrt(r L / 3) u after L layers. Asserted: twice that,
   2 sqrt(r L / 3) u per position (the demo, L = 5: 5.2u prefill, 3.7u decode; the Qwen2 fixture,
   L = 2, r = 3: 2.8u). Greedy tokens must equal runcpu's up to their first difference, which must
   come at a step whose runcpu top-2 gap is under 6 x bound x rms; decode positions are compared
   while the tokens agree. ./runcpu is itself held to HF float32 here (rel L2 <= 1e-4, the CPU
   suite's bound).
   The estimate needs products of order one. With planted k_norm outliers (gains 21-96.5) a few
   products, and the scores, exceed 100, which multiplies the q/K term by as much: those models are
   held to the HF yardstick of part 2 instead, and part 4 runs on the demo, the Qwen2 fixture,
   qwen2.5-0.5b-4l and qwen3-0.6b-4l-plain (head_dim 64, 16, 64 and 128).

5. int8 (Q8_0) weights (issue 10: int8 values, one fp16 scale per 32 weights of a row): the fixtures
   whose shapes allow int8 (dim, hidden_dim, n_heads x head_dim multiples of 32: all but the Qwen2 and
   full-vocabulary ones), the demo, qwen3-0.6b, qwen3-4b-4l and qwen2.5-0.5b-4l, exported with
   `--dtype int8`, run with a bf16 KV cache by both decode paths. q8_0() below is the spec's
   quantization written out in torch.
   - The file: every int8 value and fp16 scale equal, bit for bit, to q8_0 of HF's float32 weights
     (read by tests/test_model.py's layout; header version 2, wdtype 3).
   - Against HF float32 on the dequantized weights (every matrix replaced by float32(q) x
     float32(scale), exact in float32: the weights the int8 kernels multiply by). What is left is the
     bf16 rows' error: the bf16 KV cache, and in prefill x and the dequantized weights rounded to bf16
     for the tensor cores. So the bf16 rows' bounds, max(base bf16, HF's own bf16 error on the
     dequantized weights): prefill logits, decode logits while the greedy tokens equal HF's, greedy
     tokens up to a difference at a step whose HF gap is under 6 x bound x rms, top-1 where HF's gap
     exceeds that. ./runcpu on the int8 file (float32 weights, double sums) against the same HF within
     CPU_TOL (fixtures, demo, qwen2.5-0.5b-4l): it checks the reference as much as runcpu.
   - Reported, not asserted: the error against HF float32 on the unquantized weights, the
     quantization's own share (HF dequantized against HF unquantized) and its estimate. Q8_0 moves
     each weight by at most half its block's step d = amax / 127, uniformly: rms d / sqrt(12). For
     Gaussian weights rms(amax of 32) = 2.39 sigma, so the relative weight error is eps = 2.39 / (127
     sqrt(12)) = 5.4e-3 (bf16's rounding: 1.7e-3); the table uses eps measured on the model's own
     matrices. As in part 4, each product moves its output by eps relative, independently; the four
     products of a layer (qkv, o, gate/up, down) feed the residual stream, RMSNorm keeps relative
     errors, and the embedding and LM head add one each: the logits' relative error is about
     eps sqrt(4 L + 2) (5.8e-2 for 28 layers, 2.3e-2 for 4, 2.5e-2 for the demo's 5).
   - qwen3-0.6b, ./run int8 against ./run bf16 (bf16 KV, each path): top-1 on the fed ids, and the
     greedy tokens, equal wherever bf16's top-2 gap is clear: larger than 6 sigma, sigma the rms over
     the vocabulary of the int8 - bf16 logit difference measured at that position (both runs saw the
     same tokens up to there). Swapping the top two needs e_2 - e_1 > gap; for independent errors of
     rms sigma that difference has std sqrt(2) sigma, so 6 sigma is 4.2 std: ~1e-5 per position.
   - The demo's perplexity of the validation split (ppl mode, bf16 KV): within PPL_TOL of HF float32
     on the weights ppl mode's prefill multiplies by (the dequantized weights rounded to bf16; the
     embedding too, which ppl mode reads exactly: a second-order change), and within 1% of the bf16
     export's (the price of int8 on a trained model); HF's float32 perplexity on the dequantized and
     on the unquantized weights reported.
   - Generate mode equal to logits mode (as part 3's): the demo and qwen3-0.6b in int8.
"""
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures")
DEMO = os.path.join(ROOT, "demo")
DEMO_REF = os.path.join(FIXTURES, "demo_ref")
sys.path[:0] = [HERE, DEMO]
from gen_fixtures import nll_windows, randomize  # noqa: E402
from q8_reference import dequant, q8_0  # noqa: E402
from text import split as demo_split  # noqa: E402  (demo/text.py: the demo's training / validation cut)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_grad_enabled(False)
N_POS, N_PROMPT, N_GREEDY = 320, 16, 64
LONG_MODEL, N_LONG = "qwen3-0.6b-4l-plain", 5000  # a prompt longer than one prefill pass (run.c: 4096)
U = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
TOL = {"bf16": 2e-2, "fp16": 4e-3}       # parts 1 and 2
DEMO_TOL = {"bf16": 1e-2, "fp16": 2e-3}  # part 3
PPL_TOL = 1e-3                           # perplexity against HF float32, relative
CPU_TOL = 1e-4                           # ./runcpu against HF float32 (the CPU suite's bound)
TIGHT_STEPS = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMMON = dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=True, attn_implementation="eager")
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
MODELS = {  # name: class, config, k_norm gains: None (gen_fixtures.randomize's, outliers included), x1000, plain
    "qwen3-0.6b": (Qwen3ForCausalLM, Qwen3Config(num_hidden_layers=28, **QWEN3_06B, **COMMON), None),
    "qwen3-4b-4l": (Qwen3ForCausalLM, Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=4,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, **COMMON), None),
    "qwen2.5-0.5b-4l": (Qwen2ForCausalLM, Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                        num_attention_heads=14, num_key_value_heads=2, **COMMON), None),
    "stress": (Qwen3ForCausalLM, Qwen3Config(num_hidden_layers=4, **QWEN3_06B, **COMMON), "x1000"),
    "qwen3-0.6b-4l-plain": (Qwen3ForCausalLM, Qwen3Config(num_hidden_layers=4, **QWEN3_06B, **COMMON), "plain"),
}
# (weights, kv cache, decode path: 1 the persistent kernel, 0 the chain) combinations of part 2, per model
RUNS = [("bf16", "bf16", 1), ("bf16", "bf16", 0), ("fp16", "fp16", 1), ("fp16", "fp16", 0), ("fp32", "fp16", 1)]
MODEL_RUNS = {"stress": [("fp16", "fp16", 1)], "qwen3-0.6b-4l-plain": []}
TIGHT_MODELS = {"qwen2.5-0.5b-4l", "qwen3-0.6b-4l-plain"}  # no k_norm outliers (Qwen2 has no k_norm; part 4)
TIGHT_FIXTURES = {"qwen2_gqa7_bias_fp32"}                   # the others carry k_norm outliers
INT8_MODELS = {"qwen3-0.6b", "qwen3-4b-4l", "qwen2.5-0.5b-4l"}  # part 5's random models
INT8_CPU = {"qwen2.5-0.5b-4l"}  # ./runcpu on int8 too (and the fixtures and the demo); the others are slow on the CPU
INT8_PPL_TOL = 1e-2             # part 5: the demo's int8 perplexity against its bf16 export's, relative
work = None  # WORKDIR, set by main()
rows, failures = [], []


# ---- running the binaries -------------------------------------------------------------------------

def sh(args, timeout=300):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
    return r.stdout


def export(folder, out, dtype=None):
    if not os.path.exists(out):
        sh([sys.executable, os.path.join(ROOT, "export.py"), folder, out] + (["--dtype", dtype] if dtype else []))
    return out


def logits_run(binary, checkpoint, ids, steps=0, context=1024, kv=None, fused=None, extra=()):
    """`binary -m logits`: (float32 logits of every position, (len(ids) + steps, vocab); greedy tokens)."""
    ids_path, out_path = os.path.join(work, "ids.txt"), os.path.join(work, "logits.bin")
    open(ids_path, "w").write(" ".join(map(str, ids)))
    args = [binary, checkpoint, "-m", "logits", "-f", ids_path, "-o", out_path, "-n", str(steps), "-c", str(context)]
    args += (["-e", kv] if kv else []) + (["-a", str(fused)] if fused is not None else []) + list(extra)
    greedy = [int(t) for t in sh(args).split()]
    return np.fromfile(out_path, dtype=np.float32).reshape(len(ids) + steps, -1), greedy


def ours(model, ids, kv, fused, extra=(), context=1024):
    return logits_run("./run", model, ids, 0, context, kv, fused, extra)[0]


def greedy_ours(model, prompt, kv, fused, context=1024):
    return logits_run("./run", model, prompt, N_GREEDY, context, kv, fused)[1]


def ppl_run(binary, checkpoint, text_path, context, kv, tokenizer=None):
    """`binary -m ppl`: (nll per token, tokens scored) from its last `ppl P nll N tokens T` line."""
    args = [binary, checkpoint, "-m", "ppl", "-f", text_path, "-c", str(context), "-e", kv]
    out = sh(args + (["-z", tokenizer] if tokenizer else []), timeout=600)
    found = re.findall(r"^ppl \S+ nll (\S+) tokens (\d+)", out, re.M)
    if not found:
        raise RuntimeError(f"no 'ppl P nll N tokens T' line in: {out[-500:]!r}")
    return float(found[-1][0]), int(found[-1][1])


# ---- measures -------------------------------------------------------------------------------------

def rel_l2(got, ref):
    return np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)


def rms(logits):
    return np.sqrt((logits.astype(np.float64) ** 2).mean(axis=-1))


def top2_gap(logits):
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def check(label, got, ref, tol, hf16=0.0):
    """Per-position relative L2 within the allowed error, max(tol, HF's own 16-bit error), and
    top-1 agreement wherever HF's gap exceeds 6 x that error x rms(logits)."""
    allowed = max(tol, hf16)
    rel = rel_l2(got, ref)
    clear = top2_gap(ref) > 6 * allowed * rms(ref)
    agree = got.argmax(1) == ref.argmax(1)
    ok = bool(np.all(np.isfinite(got)) and rel.max() <= allowed and np.all(agree[clear]))
    return ok, rel, agree, clear


def first_difference(got, want):
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def greedy_verdict(got, want, gaps, noise):
    """Greedy tokens equal to the reference's up to their first difference, which (if any) must come
    at a step whose reference top-2 gap is under the noise there: (text for the table, ok)."""
    if len(got) != len(want):
        return f"{len(got)} tokens for {len(want)}", False
    d = first_difference(got, want)
    if d == len(want):
        return f"{d}/{d}", True
    ok = gaps[d] < noise[d]
    return f"{d}/{len(want)} (step {d}: gap {gaps[d]:.3g} {'<' if ok else '>='} noise {noise[d]:.3g})", ok


def add_row(model, run, error, agreement, greedy, ok, note="ok"):
    rows.append((model, run, error, agreement, greedy, note if ok else "FAIL"))
    if not ok:
        failures.append((model, run))


def hf16_errors(model, ids, ref, positions=None):
    """HF's own error running the model's weights in bf16 and fp16 (inf where it overflows). Casts
    the model in place: call it last."""
    errors = {}
    for name, dtype in DTYPES.items():
        low = model.to(dtype)(torch.tensor([ids]).cuda()).logits[0].float().cpu().numpy()
        low = low if positions is None else low[positions]
        errors[name] = float(rel_l2(low, ref).max()) if np.all(np.isfinite(low)) else float("inf")
    return errors


def coarsest(wdtype, kv):
    """The coarsest 16-bit format a run uses: bf16 if the weights or the cache are bf16 (prefill
    rounds activations to the weights' type for the tensor cores), else fp16."""
    return "bf16" if "bf16" in (wdtype, kv) else "fp16"


def yardstick(hf16, wdtype, kv):
    """HF's own error in the coarsest 16-bit format of the run; bf16 where HF's fp16 overflows."""
    fmt = coarsest(wdtype, kv)
    return hf16[fmt] if np.isfinite(hf16[fmt]) else hf16["bf16"]


def head_dim_of(config):
    """head_dim of a config.json dict (Qwen2's is hidden_size / heads)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def hf_logits(model, ids):
    return model(torch.tensor([ids]).cuda()).logits[0].float().cpu().numpy()


def lookahead(name, checkpoint, prompt_text, tokenizer, steps, context, weights="bf16 w"):
    """Generate mode's greedy tokens (each step enqueued ahead, fed by the GPU's argmax) against logits
    mode's (fed by the host) on the prompt ids generate mode reports: equal, up to generate's stop."""
    r = subprocess.run(["./run", checkpoint, "-z", tokenizer, "-i", prompt_text, "-t", "0", "-n", str(steps),
                        "-c", str(context), "-v", "1", "-a", "1"], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"generate failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    found = {k: [int(t) for t in v.split()] for k, v in re.findall(r"^(prompt|generated) ids:(.*)$", r.stderr, re.M)}
    prompt_ids, generated = found["prompt"], found.get("generated", [])
    host_fed = logits_run("./run", checkpoint, prompt_ids, steps, context, "bf16", 1)[1]
    ok = len(generated) > 0 and generated == host_fed[:len(generated)]
    add_row(name, f"{weights}, bf16 KV, fused, generate mode: steps enqueued ahead",
            f"{len(generated)} tokens vs logits mode", "-",
            f"{first_difference(generated, host_fed)}/{len(generated)} equal", ok)


# ---- part 4: ./run with fp32 weights against ./runcpu ----------------------------------------------

def tight_bound(kv, n_layers, roundings):
    """Twice the estimate sqrt(roundings x n_layers / 3) u of the docstring's part 4."""
    return 2 * U[kv] * math.sqrt(roundings * n_layers / 3)


def tight(name, checkpoint, ids, hf_ref, n_layers, head_dim, context=1024):
    """Part 4 on one fp32 checkpoint: ./runcpu once (its fed positions against HF float32 hf_ref),
    then ./run with each KV type and attention kernel against it."""
    cpu, cpu_greedy = logits_run("./runcpu", checkpoint, ids, TIGHT_STEPS, context)
    n = len(ids)
    cpu_rel = rel_l2(cpu[:n], hf_ref)
    add_row(name, "fp32 w: runcpu vs HF float32", f"{cpu_rel.max():.2e} <= {CPU_TOL:.0e}", "-", "-",
            bool(cpu_rel.max() <= CPU_TOL))
    prefill_roundings = 4 if head_dim in (64, 128) else 3
    for kv in ("bf16", "fp16"):
        bound_p, bound_d = tight_bound(kv, n_layers, prefill_roundings), tight_bound(kv, n_layers, 2)
        # the bound of each row: prefill rows, then decode rows; noise of the greedy step that row decides
        bound = np.array([bound_p] * n + [bound_d] * TIGHT_STEPS)
        noise = 6 * bound * rms(cpu)
        for fused in (1, 0):
            gpu, gpu_greedy = logits_run("./run", checkpoint, ids, TIGHT_STEPS, context, kv, fused)
            d = first_difference(gpu_greedy, cpu_greedy)  # rows n .. n+d-1 were fed the same tokens
            rel_p, rel_d = rel_l2(gpu[:n], cpu[:n]), rel_l2(gpu[n:n + d], cpu[n:n + d])
            clear = top2_gap(cpu[:n]) > noise[:n]
            agree = gpu[:n].argmax(1) == cpu[:n].argmax(1)
            greedy, greedy_ok = greedy_verdict(gpu_greedy, cpu_greedy, top2_gap(cpu[n - 1:]), noise[n - 1:])
            worst_d = rel_d.max() if d else 0.0
            ok = bool(np.all(np.isfinite(gpu)) and rel_p.max() <= bound_p and worst_d <= bound_d
                      and np.all(agree[clear]) and greedy_ok)
            add_row(name, f"fp32 w, {kv} KV, {'fused' if fused else 'unfused'}: vs runcpu",
                    f"prefill {rel_p.max() / U[kv]:.2f}u <= {bound_p / U[kv]:.1f}u, "
                    f"decode {worst_d / U[kv]:.2f}u <= {bound_d / U[kv]:.1f}u ({d} steps)",
                    f"{agree.mean():.1%} ({agree[clear].mean():.0%} of {clear.sum()} clear)", greedy, ok)


# ---- part 1: the committed fixtures ---------------------------------------------------------------

def own_nll(checkpoint, ids, ctx, kv):
    """The mean nll of ppl mode's windows, from the float64 log-softmax of `./run -m logits` on each."""
    total, count = 0.0, 0
    for s in range(0, len(ids), ctx):
        w = ids[s:s + ctx]
        if len(w) < 2:
            break
        logits = ours(checkpoint, w, kv, 0, context=ctx)[:-1].astype(np.float64)
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        total += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return total / count


def ppl_check(name, checkpoint, meta, tok, text):
    """`./run -m ppl` (prefill, LM head and cross entropy on the GPU) within PPL_TOL of HF's float32
    nll from the fixture over the same number of tokens, both KV types; with the bf16 cache also
    within 1e-5 of the float64 log-softmax of `./run -m logits` on the same windows (one ./run per
    window, so once)."""
    ctx = meta["ppl_ctx"]
    text = text[:meta["ppl_text_bytes"]]
    path = os.path.join(work, "ppl.txt")
    open(path, "w", encoding="utf-8").write(text)
    hf = meta["ppl_nll_sum"] / meta["ppl_scored"]
    for kv in ("bf16", "fp16"):
        nll, tokens = ppl_run("./run", checkpoint, path, ctx, kv)
        rel_hf = abs(nll - hf) / abs(hf)
        ok = tokens == meta["ppl_scored"] and rel_hf <= PPL_TOL
        own = "-"
        if kv == "bf16":
            rel_own = abs(nll - own_nll(checkpoint, tok.encode(text), ctx, kv)) / abs(nll)
            own, ok = f"vs own logits {rel_own:.1e} <= 1e-5", ok and rel_own <= 1e-5
        add_row(name, f"own w, {kv} KV: ppl mode, ctx {ctx}",
                f"nll {nll:.5f} vs HF fp32 {hf:.5f}: {rel_hf:.1e} <= {PPL_TOL:.0e}", own,
                f"{tokens} tokens (HF {meta['ppl_scored']})", ok)


def fixtures(tok, text):
    """./run on the committed tiny fixtures: logits against HF's and ./runcpu's, greedy tokens
    against HF's; perplexity where the fixture has a reference; part 4 on TIGHT_FIXTURES."""
    for name in sorted(os.listdir(FIXTURES)):
        folder = os.path.join(FIXTURES, name)
        if not os.path.exists(os.path.join(folder, "config.json")):
            continue
        meta = json.load(open(os.path.join(folder, "ref.json")))
        checkpoint = export(folder, os.path.join(work, name + ".bin"))
        if "ppl_ctx" in meta:
            guarded(name, "ppl", lambda: ppl_check(name, checkpoint, meta, tok, text))
        if os.path.exists(os.path.join(folder, "ref_logits.npy")):
            guarded(name, "logits", lambda: fixture_logits(name, folder, checkpoint, meta))
            if int8_shape(json.load(open(os.path.join(folder, "config.json")))):
                guarded(name, "int8", lambda: fixture_int8(name, folder, meta))


def fixture_logits(name, folder, checkpoint, meta):
    ref = np.load(os.path.join(folder, "ref_logits.npy"))
    ids = meta["ids"]
    cpu = logits_run("./runcpu", checkpoint, ids, context=512)[0]
    cls = Qwen3ForCausalLM if name.startswith("qwen3") else Qwen2ForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").cuda()
    hf16 = hf16_errors(model, ids, ref)
    del model
    wdtype = "bf16" if name.endswith("bf16") else "fp32"
    for kv, fused in (("bf16", 1), ("bf16", 0), ("fp16", 1), ("fp16", 0)):
        got = ours(checkpoint, ids, kv, fused, context=512)
        ok, rel, agree, clear = check(name, got, ref, TOL[kv], yardstick(hf16, wdtype, kv))
        ok_cpu, rel_cpu, _, _ = check(name, got, cpu, TOL[kv], yardstick(hf16, wdtype, kv))
        # greedy tokens equal to HF's up to the first step whose HF gap is under the noise
        g = greedy_ours(checkpoint, meta["greedy_prompt"], kv, fused, context=512)
        noise = 6 * TOL[kv] * np.sqrt((ref ** 2).mean())
        upto = min(next((i for i, gap in enumerate(meta["greedy_margins"]) if gap < noise), N_GREEDY) + 1, N_GREEDY)
        ok = ok and ok_cpu and g[:upto] == meta["greedy"][:upto]
        add_row(name, f"own w, {kv} KV, {'fused' if fused else 'unfused'}",
                f"{rel.max():.2e} / {np.median(rel):.1e} (HF 16-bit {yardstick(hf16, wdtype, kv):.1e})",
                f"{agree.mean():.1%} (vs runcpu {rel_cpu.max():.1e})", f"{upto}/{N_GREEDY}", ok)
    if name in TIGHT_FIXTURES:
        config = json.load(open(os.path.join(folder, "config.json")))
        tight(name, checkpoint, ids, ref, config["num_hidden_layers"], head_dim_of(config), context=512)


# ---- part 3: the trained demo model ---------------------------------------------------------------

def demo_hf(ref, val, tight_ids):
    """What the demo checks need from HF, computed live on the GPU: float32 logits of the first
    ref["context"] validation tokens at ref.json's positions, of the greedy sequence (prompt + HF's
    200 tokens) at every position, and of tight_ids; then the same model's own bf16 and fp16 error
    at the positions."""
    model = Qwen3ForCausalLM.from_pretrained(DEMO, dtype=torch.float32, attn_implementation="eager").cuda().eval()
    window = val[:ref["context"]]
    hf = {"positions": hf_logits(model, window)[ref["positions"]],
          "greedy": hf_logits(model, ref["greedy_prompt"] + ref["greedy"]),
          "tight": hf_logits(model, tight_ids)}
    hf["own16"] = hf16_errors(model, window, np.load(os.path.join(DEMO_REF, "ref_logits.npy")), ref["positions"])
    del model
    torch.cuda.empty_cache()
    return hf


def demo(text):
    """Part 3, and part 4 on the demo's fp32 export."""
    ref = json.load(open(os.path.join(DEMO_REF, "ref.json")))
    ref_logits = np.load(os.path.join(DEMO_REF, "ref_logits.npy"))
    val = [int(t) for t in np.load(os.path.join(DEMO_REF, "val_ids.npy"))]
    ctx, positions, prompt, hf_greedy = ref["context"], ref["positions"], ref["greedy_prompt"], ref["greedy"]
    val_path = os.path.join(work, "demo_val.txt")
    open(val_path, "w", encoding="utf-8").write(demo_split(text)[1])
    tight_ids = val[:ctx - TIGHT_STEPS]
    hf = demo_hf(ref, val, tight_ids)
    live = rel_l2(hf["positions"], ref_logits).max()
    add_row("demo", "HF float32 live vs committed reference", f"{live:.1e} <= {CPU_TOL:.0e}", "-", "-",
            bool(live <= CPU_TOL))
    hf_ppl = math.exp(ref["ppl_nll_sum"] / ref["ppl_scored"])
    n_prompt = len(prompt)
    for wdtype in ("bf16", "fp16"):
        checkpoint = export(DEMO, os.path.join(work, f"demo.{wdtype}.bin"), wdtype)
        for kv in ("bf16", "fp16"):
            fmt = coarsest(wdtype, kv)
            bound = max(DEMO_TOL[fmt], hf["own16"][fmt])
            which = (f"bound {bound:.1e}: " + (f"HF {fmt} (base {DEMO_TOL[fmt]:.0e})" if hf["own16"][fmt] > DEMO_TOL[fmt]
                     else f"base (HF {fmt} {hf['own16'][fmt]:.1e})"))
            prefill = logits_run("./run", checkpoint, val[:ctx], 0, ctx, kv, 0)[0][positions]
            rel_p = rel_l2(prefill, ref_logits)
            clear = top2_gap(ref_logits) > 6 * bound * rms(ref_logits)
            agree = prefill.argmax(1) == ref_logits.argmax(1)
            for fused in (1, 0):
                got, greedy = logits_run("./run", checkpoint, prompt, len(hf_greedy), ctx, kv, fused)
                d = first_difference(greedy, hf_greedy)  # rows up to n_prompt + d - 1 saw HF's tokens
                rel_d = rel_l2(got[n_prompt:n_prompt + d], hf["greedy"][n_prompt:n_prompt + d])
                worst_d = rel_d.max() if d else 0.0
                noise = 6 * bound * rms(hf["greedy"][n_prompt - 1:])
                greedy_text, greedy_ok = greedy_verdict(greedy, hf_greedy, ref["greedy_margins"], noise)
                ok = bool(np.all(np.isfinite(prefill)) and np.all(np.isfinite(got)) and rel_p.max() <= bound
                          and worst_d <= bound and np.all(agree[clear]) and greedy_ok)
                add_row("demo", f"{wdtype} w, {kv} KV, {'fused' if fused else 'unfused'}",
                        f"prefill {rel_p.max():.2e}, decode {worst_d:.2e} ({d} steps); {which}",
                        f"{agree.mean():.1%} ({agree[clear].mean():.0%} of {clear.sum()} clear)", greedy_text, ok)
            nll, tokens = ppl_run("./run", checkpoint, val_path, ctx, kv, os.path.join(DEMO, "tokenizer.bin"))
            rel = abs(math.exp(nll) / hf_ppl - 1)
            add_row("demo", f"{wdtype} w, {kv} KV: ppl of the validation split, ctx {ctx}",
                    f"ppl {math.exp(nll):.4f} vs HF fp32 {hf_ppl:.4f}: {rel:.1e} <= {PPL_TOL:.0e}", "-",
                    f"{tokens} tokens (HF {ref['ppl_scored']})", rel <= PPL_TOL and tokens == ref["ppl_scored"])
    guarded("demo", "int8", lambda: demo_int8(ref, ref_logits, val, val_path, hf_ppl))
    demo_tok = Tokenizer.from_file(os.path.join(DEMO, "tokenizer.json"))
    lookahead("demo", os.path.join(work, "demo.bf16.bin"), demo_tok.decode(prompt), os.path.join(DEMO, "tokenizer.bin"),
              len(hf_greedy), ctx)
    config = json.load(open(os.path.join(DEMO, "config.json")))
    tight("demo", export(DEMO, os.path.join(work, "demo.fp32.bin"), "fp32"), tight_ids, hf["tight"],
          config["num_hidden_layers"], head_dim_of(config), context=ctx)


# ---- part 2: random models of the real shapes -----------------------------------------------------

def build(name, seed, path):
    """The seeded random model `name` saved (bf16) as a HF folder at path; returns it in float32 on the GPU."""
    cls, config, gains = MODELS[name]
    torch.manual_seed(seed)
    model = cls(config).float()
    randomize(model, seed)
    plain = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        if gains == "x1000":
            layer.self_attn.k_norm.weight.mul_(1000)
        elif gains == "plain":  # randomize's gains without its outlier channels
            w = layer.self_attn.k_norm.weight
            w.copy_(torch.rand(w.shape, generator=plain) * 1.6 + 1.5)
    model.to(torch.bfloat16).save_pretrained(path)
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").cuda().eval()


def stops_not_finite(args):
    """Runs a command that must stop with exit status 1 and one last 'error: ... not finite' line:
    (that line, whether it did)."""
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    last = lines[-1] if lines else f"exit status {r.returncode}, no message"
    errors = [l for l in lines if l.startswith("error: ")]
    return last, r.returncode == 1 and errors == [last] and "not finite" in last


def long_prompt(name, path, long_ids, long_ref, long_hf16):
    """A prompt of N_LONG tokens, more than one prefill pass: ./run (bf16; -a 1 the TMA products, -a 0 the
    simple ones) against HF float32 at every position, with part 2's bounds."""
    checkpoint = export(path, os.path.join(work, f"{name}.bf16.bin"), "bf16")
    bound = yardstick(long_hf16, "bf16", "bf16")
    for fused in (1, 0):
        got = ours(checkpoint, long_ids, "bf16", fused, context=N_LONG + 64)
        ok, rel, agree, clear = check(name, got, long_ref, TOL["bf16"], bound)
        add_row(name, f"bf16 w, bf16 KV, {'fused' if fused else 'unfused'}: a {N_LONG}-token prompt (two passes)",
                f"{rel.max():.2e} / {np.median(rel):.1e} (HF 16-bit {bound:.1e})",
                f"{agree.mean():.1%} ({agree[clear].mean():.0%} of {clear.sum()} clear)", "-", ok)


def random_model(name, seed, ids, prompt, text_path, tok, long_ids):
    path = os.path.join(work, name)
    model = build(name, seed, path)
    ref = hf_logits(model, ids)
    runs = MODEL_RUNS.get(name, RUNS)
    if runs:
        gen = model.generate(torch.tensor([prompt]).cuda(), max_new_tokens=N_GREEDY, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        hf_greedy = gen.sequences[0, len(prompt):].tolist()
        hf_gaps = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in gen.scores]
        hf_rms = [float(s[0].float().pow(2).mean().sqrt()) for s in gen.scores]
        hf16 = hf16_errors(model, ids, ref)
    if name == LONG_MODEL:  # a model of no runs above: not yet cast by hf16_errors
        long_ref = hf_logits(model, long_ids)
        long_hf16 = hf16_errors(model, long_ids, long_ref)
    del model
    torch.cuda.empty_cache()
    for wdtype, kv, fused in runs:
        checkpoint = export(path, os.path.join(work, f"{name}.{wdtype}.bin"), wdtype)
        tol = TOL[kv]
        got = ours(checkpoint, ids, kv, fused)
        if name == "stress":  # without the scale K overflows: ./run must stop, from either mode's check
            ids_path = os.path.join(work, "ids.txt")
            open(ids_path, "w").write(" ".join(map(str, ids)))
            for mode, args in (("logits mode: the GPU argmax flags it", ["-m", "logits", "-f", ids_path]),
                               ("ppl mode: the GPU cross entropy flags it", ["-m", "ppl", "-f", text_path, "-c", "64"])):
                line, stopped = stops_not_finite(["./run", checkpoint, *args, "-e", kv, "-a", str(fused), "-K", "0"])
                add_row(name, f"fp16 w, fp16 KV, no k_scale, {mode}", f"(HF fp16: {hf16['fp16']:.1e})", "-",
                        line[:60], stopped, "stopped: ok")
        ok, rel, agree, clear = check(name, got, ref, tol, yardstick(hf16, wdtype, kv))
        # greedy: equal to HF up to the first step whose HF gap is under the noise
        g = greedy_ours(checkpoint, prompt, kv, fused)
        first_tie = next((i for i, (gap, r) in enumerate(zip(hf_gaps, hf_rms)) if gap < 6 * tol * r), N_GREEDY)
        upto = min(first_tie + 1, N_GREEDY)
        ok = ok and g[:upto] == hf_greedy[:upto]
        add_row(name, f"{wdtype} w, {kv} KV, {'fused' if fused else 'unfused'}",
                f"{rel.max():.2e} / {np.median(rel):.1e} (HF 16-bit {yardstick(hf16, wdtype, kv):.1e})",
                f"{agree.mean():.1%} ({agree[clear].mean():.0%} of {clear.sum()} clear)", f"{upto}/{N_GREEDY}", ok)
    if name == "qwen3-0.6b":
        lookahead(name, os.path.join(work, f"{name}.bf16.bin"), tok.decode(prompt), os.path.join(ROOT, "tokenizer.bin"),
                  N_GREEDY, 1024)
    if name in TIGHT_MODELS:
        config = MODELS[name][1].to_dict()
        tight(name, export(path, os.path.join(work, f"{name}.fp32.bin"), "fp32"), ids, ref,
              config["num_hidden_layers"], head_dim_of(config))
    if name in INT8_MODELS:
        guarded(name, "int8", lambda: random_int8(name, path, ids, prompt, ref, tok))
    if name == LONG_MODEL:
        guarded(name, "long prompt", lambda: long_prompt(name, path, long_ids, long_ref, long_hf16))


# ---- part 5: int8 weights -------------------------------------------------------------------------

def int8_shape(config):
    """Whether a config.json dict's shape allows int8 weights: dim, hidden_dim, n_heads x head_dim multiples of 32."""
    return all(n % 32 == 0 for n in (config["hidden_size"], config["intermediate_size"],
                                     config["num_attention_heads"] * head_dim_of(config)))


def dequantize_(model):
    """Replaces every matrix of the HF model (its 2-D parameters: the embedding, the projections, an untied
    lm_head; a tied lm_head is the embedding's parameter, done once) in place by its Q8_0 values
    dequantized, float32(q) x float32(scale). Returns ({parameter name: (q, scales)}, the relative weight
    error ||dequantized - w|| / ||w|| over all of them)."""
    quant, err2, norm2 = {}, 0.0, 0.0
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        q, sc = q8_0(p.data)
        deq = dequant(q, sc)
        err2 += float((deq - p.data).double().pow(2).sum())
        norm2 += float(p.data.double().pow(2).sum())
        p.data.copy_(deq)
        quant[name] = (q, sc)
    return quant, math.sqrt(err2 / norm2)


def int8_export_check(name, checkpoint, quant, n_layers):
    """The int8 file's values and scales, bit for bit, against quant (q8_0 of HF's float32 weights, by
    parameter name), the file read by tests/test_model.py's checkpoint() (README's layout)."""
    from test_model import checkpoint as read_checkpoint  # noqa: E402 (here: it imports harness, which clears tests/tmp)
    h, t, _ = read_checkpoint(checkpoint)

    def stacked(*keys):  # the file's stacked (layers, rows, cols) matrix and its scales: HF's rows concatenated
        return tuple(torch.stack([torch.cat([quant[f"model.layers.{l}.{k}.weight"][i] for k in keys])
                                  for l in range(n_layers)]) for i in (0, 1))
    want = {"embedding": quant["model.embed_tokens.weight"],
            "wqkv": stacked("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "wo": stacked("self_attn.o_proj"), "w_gate_up": stacked("mlp.gate_proj", "mlp.up_proj"),
            "w_down": stacked("mlp.down_proj")}
    if "lm_head.weight" in quant:  # untied
        want["lm_head"] = quant["lm_head.weight"]
    bad, total = [], 0
    for key, (q, sc) in want.items():
        fq, fs = t.get(key), t.get(key + "_scales")
        if fq is None or fs is None or fq.dtype != np.int8 or fs.dtype != np.float16 or fq.size != q.numel() \
                or fs.size != sc.numel():
            bad.append(f"{key}: missing, or not int8 + fp16 scales of its size")
            continue
        nq = int(np.count_nonzero(fq.reshape(-1) != q.cpu().numpy().reshape(-1)))
        ns = int(np.count_nonzero(fs.reshape(-1).view(np.uint16) != sc.cpu().numpy().reshape(-1).view(np.uint16)))
        total += q.numel() + sc.numel()
        if nq or ns:
            bad.append(f"{key}: {nq} values, {ns} scales differ")
    extra = sorted(k for k in t if t[k].dtype == np.int8 and k not in want)
    bad += [f"{k}: not expected" for k in extra]
    ok = h["version"] == 2 and h["wdtype"] == 3 and not bad
    add_row(name, "int8 export vs own Q8_0 of HF's float32 weights",
            f"{total} values and scales: " + ("bit-equal" if not bad else "; ".join(bad)[:150]), "-",
            f"version {h['version']}, wdtype {h['wdtype']}", ok)


def hf_greedy(model, prompt, steps):
    """HF's greedy tokens from prompt, each step's top-2 gap, and HF's logits on prompt + those tokens."""
    gen = model.generate(torch.tensor([prompt]).cuda(), max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = gen.sequences[0, len(prompt):].tolist()
    gaps = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in gen.scores]
    return tokens, gaps, hf_logits(model, prompt + tokens)


def hf_int8(name, model, checkpoint, ids, prompt, steps, n_layers, positions=None, extra=None):
    """HF float32 (model, on the GPU) on its Q8_0-dequantized weights: dequantizes in place (checking the
    int8 file's bytes against the quantization first), then its logits on ids (at positions), greedy
    tokens from prompt (their gaps, the logits on prompt + them), extra(model)'s entries if given, and last
    HF's own bf16 error on the dequantized weights (it casts the model). Also the measured relative
    weight error eps and the estimate eps sqrt(4 L + 2) of the quantization's logit error."""
    quant, eps = dequantize_(model)
    guarded(name, "int8 export", lambda: int8_export_check(name, checkpoint, quant, n_layers))
    quant.clear()  # the GPU memory of the int8 copies
    logits = hf_logits(model, ids)
    hf = {"eps": eps, "est": eps * math.sqrt(4 * n_layers + 2),
          "logits": logits if positions is None else logits[positions]}
    hf["greedy"], hf["gaps"], hf["greedy_logits"] = hf_greedy(model, prompt, steps)
    if extra:
        hf.update(extra(model))
    hf["own_bf16"] = hf16_errors(model, ids, hf["logits"], positions)["bf16"]
    return hf


def int8_rows(name, checkpoint, hf, ids, prompt, unquant, tol, context, positions=None, cpu=False):
    """Part 5's rows for one int8 file against hf (hf_int8's), bf16 KV: the fed ids (prefill, at positions),
    each decode path's greedy tokens and their logits while they equal HF's; tol the base bf16 bound;
    unquant HF float32 on the unquantized weights at the same rows, for the report; cpu: ./runcpu too."""
    bound = max(tol, hf["own_bf16"])
    which = f"bound {bound:.1e} ({'HF bf16' if hf['own_bf16'] > tol else 'base'})"
    n = len(prompt)
    pre = logits_run("./run", checkpoint, ids, 0, context, "bf16", 0)[0]
    pre = pre if positions is None else pre[positions]
    rel_p = rel_l2(pre, hf["logits"])
    clear = top2_gap(hf["logits"]) > 6 * bound * rms(hf["logits"])
    agree = pre.argmax(1) == hf["logits"].argmax(1)
    report = (f"vs HF fp32 unquantized {rel_l2(pre, unquant).max():.1e} (quantization alone "
              f"{rel_l2(hf['logits'], unquant).max():.1e}, est. {hf['est']:.1e} from eps {hf['eps']:.1e})")
    for fused in (1, 0):
        got, greedy = logits_run("./run", checkpoint, prompt, len(hf["greedy"]), context, "bf16", fused)
        d = first_difference(greedy, hf["greedy"])  # rows up to n + d - 1 saw HF's tokens
        rel_d = rel_l2(got[n:n + d], hf["greedy_logits"][n:n + d])
        worst_d = rel_d.max() if d else 0.0
        noise = 6 * bound * rms(hf["greedy_logits"][n - 1:])
        greedy_text, greedy_ok = greedy_verdict(greedy, hf["greedy"], hf["gaps"], noise)
        ok = bool(np.all(np.isfinite(pre)) and np.all(np.isfinite(got)) and rel_p.max() <= bound
                  and worst_d <= bound and np.all(agree[clear]) and greedy_ok)
        add_row(name, f"int8 w, bf16 KV, {'fused' if fused else 'unfused'}: vs HF fp32 on the dequantized w",
                f"prefill {rel_p.max():.2e}, decode {worst_d:.2e} ({d} steps); {which}; {report}",
                f"{agree.mean():.1%} ({agree[clear].mean():.0%} of {clear.sum()} clear)", greedy_text, ok)
    if cpu:
        cpu_logits = logits_run("./runcpu", checkpoint, ids, 0, context)[0]
        rel_c = rel_l2(cpu_logits if positions is None else cpu_logits[positions], hf["logits"])
        add_row(name, "int8 w: runcpu vs HF fp32 on the dequantized w", f"{rel_c.max():.2e} <= {CPU_TOL:.0e}", "-",
                "-", bool(rel_c.max() <= CPU_TOL))


def fixture_int8(name, folder, meta):
    """Part 5 on a committed fixture (its ids, greedy prompt; HF's committed float32 logits unquantized)."""
    config = json.load(open(os.path.join(folder, "config.json")))
    checkpoint = export(folder, os.path.join(work, name + ".int8.bin"), "int8")
    cls = Qwen3ForCausalLM if name.startswith("qwen3") else Qwen2ForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").cuda().eval()
    hf = hf_int8(name, model, checkpoint, meta["ids"], meta["greedy_prompt"], N_GREEDY, config["num_hidden_layers"])
    del model
    torch.cuda.empty_cache()
    int8_rows(name, checkpoint, hf, meta["ids"], meta["greedy_prompt"], np.load(os.path.join(folder, "ref_logits.npy")),
              TOL["bf16"], 512, cpu=True)


def random_int8(name, path, ids, prompt, ref, tok):
    """Part 5 on a random model of part 2 (saved at path; ref: HF float32 on its unquantized weights on ids);
    on qwen3-0.6b also int8 against bf16 and generate mode."""
    cls, config = MODELS[name][:2]
    checkpoint = export(path, os.path.join(work, f"{name}.int8.bin"), "int8")
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").cuda().eval()
    hf = hf_int8(name, model, checkpoint, ids, prompt, N_GREEDY, config.num_hidden_layers)
    del model
    torch.cuda.empty_cache()
    int8_rows(name, checkpoint, hf, ids, prompt, ref, TOL["bf16"], 1024, cpu=name in INT8_CPU)
    if name == "qwen3-0.6b":
        bf16 = export(path, os.path.join(work, f"{name}.bf16.bin"), "bf16")
        guarded(name, "int8 vs bf16", lambda: int8_vs_bf16(name, checkpoint, bf16, ids, prompt))
        guarded(name, "int8 generate", lambda: lookahead(name, checkpoint, tok.decode(prompt),
                                                         os.path.join(ROOT, "tokenizer.bin"), N_GREEDY, 1024, "int8 w"))


def int8_vs_bf16(name, int8, bf16, ids, prompt):
    """./run int8 against ./run bf16 (bf16 KV): top-1 on the fed ids and each path's greedy tokens equal
    wherever bf16's top-2 gap exceeds 6 x the rms over the vocabulary of the int8 - bf16 logit
    difference at that position (the docstring's part 5)."""
    def sigma(a, b):  # per position: rms over the vocabulary of a - b
        return np.sqrt(((a.astype(np.float64) - b) ** 2).mean(axis=1))
    n = len(prompt)
    pre8, pre16 = (logits_run("./run", c, ids, 0, 1024, "bf16", 0)[0] for c in (int8, bf16))
    s_pre = sigma(pre8, pre16)
    clear = top2_gap(pre16) > 6 * s_pre
    agree = pre8.argmax(1) == pre16.argmax(1)
    rel = rel_l2(pre8, pre16)
    for fused in (1, 0):
        got8, greedy8 = logits_run("./run", int8, prompt, N_GREEDY, 1024, "bf16", fused)
        got16, greedy16 = logits_run("./run", bf16, prompt, N_GREEDY, 1024, "bf16", fused)
        # row n - 1 + k decides step k; up to the first difference both runs were fed the same tokens
        greedy_text, greedy_ok = greedy_verdict(greedy8, greedy16, top2_gap(got16[n - 1:]),
                                                6 * sigma(got8, got16)[n - 1:])
        ok = bool(np.all(np.isfinite(pre8)) and np.all(np.isfinite(got8)) and np.all(agree[clear]) and greedy_ok)
        add_row(name, f"int8 vs bf16 w (./run both), bf16 KV, {'fused' if fused else 'unfused'}",
                f"prefill rel L2 {rel.max():.1e} / {np.median(rel):.1e}; clear: gap > 6 sigma, sigma/rms "
                f"{np.median(s_pre / rms(pre16)):.1e}",
                f"{agree.mean():.1%} ({agree[clear].mean():.0%} of {clear.sum()} clear)", greedy_text, ok)


def demo_int8(ref, ref_logits, val, val_path, hf_ppl):
    """Part 5 on the demo: against HF float32 dequantized at ref.json's positions of the first context
    validation tokens and on its greedy prompt; the validation split's perplexity; generate mode."""
    ctx, positions, prompt = ref["context"], ref["positions"], ref["greedy_prompt"]
    checkpoint = export(DEMO, os.path.join(work, "demo.int8.bin"), "int8")
    config = json.load(open(os.path.join(DEMO, "config.json")))

    def mean_nll(model):  # HF's nll of ppl mode's windows on the dequantized weights, then on them rounded to bf16
        mean = lambda windows: sum(s for s, _ in windows) / sum(c for _, c in windows)  # noqa: E731
        out = {"nll": mean(nll_windows(model, val, ctx))}
        for p in model.parameters():
            if p.dim() == 2:
                p.data.copy_(p.data.to(torch.bfloat16).float())
        out["nll_bf16w"] = mean(nll_windows(model, val, ctx))
        return out

    model = Qwen3ForCausalLM.from_pretrained(DEMO, dtype=torch.float32, attn_implementation="eager").cuda().eval()
    hf = hf_int8("demo", model, checkpoint, val[:ctx], prompt, len(ref["greedy"]), config["num_hidden_layers"],
                 positions, mean_nll)
    del model
    torch.cuda.empty_cache()
    int8_rows("demo", checkpoint, hf, val[:ctx], prompt, ref_logits, DEMO_TOL["bf16"], ctx, positions, cpu=True)
    tokenizer = os.path.join(DEMO, "tokenizer.bin")
    nll8, tokens = ppl_run("./run", checkpoint, val_path, ctx, "bf16", tokenizer)
    nll16, _ = ppl_run("./run", export(DEMO, os.path.join(work, "demo.bf16.bin"), "bf16"), val_path, ctx, "bf16",
                       tokenizer)
    ppl8, ppl16, hf_w = math.exp(nll8), math.exp(nll16), math.exp(hf["nll_bf16w"])
    rel_w, rel_16 = abs(ppl8 / hf_w - 1), abs(ppl8 / ppl16 - 1)
    add_row("demo", f"int8 w, bf16 KV: ppl of the validation split, ctx {ctx}",
            f"ppl {ppl8:.4f} vs HF fp32 on bf16(dequantized w) {hf_w:.4f}: {rel_w:.1e} <= {PPL_TOL:.0e}; "
            f"vs the bf16 export's {ppl16:.4f}: {rel_16:.1e} <= {INT8_PPL_TOL:.0e}",
            f"HF fp32: dequantized {math.exp(hf['nll']):.4f}, unquantized {hf_ppl:.4f}",
            f"{tokens} tokens (HF {ref['ppl_scored']})",
            tokens == ref["ppl_scored"] and rel_w <= PPL_TOL and rel_16 <= INT8_PPL_TOL)
    demo_tok = Tokenizer.from_file(os.path.join(DEMO, "tokenizer.json"))
    guarded("demo", "int8 generate", lambda: lookahead("demo", checkpoint, demo_tok.decode(prompt), tokenizer,
                                                       len(ref["greedy"]), ctx, "int8 w"))


# ---- the table ------------------------------------------------------------------------------------

def guarded(model, part, fn):
    """Runs one part; an exception becomes a failed row (with its last line), and the rest goes on."""
    start = time.time()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (any failure of a part is reported, not fatal)
        traceback.print_exc()
        add_row(model, part, f"raised {type(e).__name__}: {str(e).strip().splitlines()[-1][:150] if str(e).strip() else ''}",
                "-", "-", False)
    print(f"[{model} {part}: {time.time() - start:.0f} s]", file=sys.stderr, flush=True)


def print_table():
    header = ("model", "run", "error", "top-1 agreement", "greedy", "result")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for r in [header] + rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nparity: {len(rows) - len(failures)}/{len(rows)} rows ok" + (f", FAILED: {failures}" if failures else ""))


def main():
    global work
    work, text_file, tok_dir = sys.argv[1:4]
    parts = ["fixtures", "demo", *MODELS]  # PARITY_ONLY=a,b,...: only those
    only = os.environ["PARITY_ONLY"].split(",") if os.environ.get("PARITY_ONLY") else parts
    if not set(only) <= set(parts):
        sys.exit(f"error: PARITY_ONLY: each of {', '.join(parts)}")
    os.makedirs(work, exist_ok=True)
    text = open(text_file, encoding="utf-8").read()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    try:
        if "fixtures" in only:
            guarded("fixtures", "all", lambda: fixtures(tok, text))
        if "demo" in only:
            guarded("demo", "all", lambda: demo(text))
        text_ids = tok.encode(text[:40000])  # ~10k tokens: N_POS, the prompt at 1000, and N_LONG
        ids, prompt, long_ids = text_ids[:N_POS], text_ids[1000:1000 + N_PROMPT], text_ids[:N_LONG]
        text_path = os.path.join(work, "text.txt")  # for ppl mode: the text of ids and a little more
        open(text_path, "w", encoding="utf-8").write(text[:2000])
        for seed, name in enumerate(MODELS, start=10):  # a model's seed does not depend on PARITY_ONLY
            if name in only:
                guarded(name, "all", lambda: random_model(name, seed, ids, prompt, text_path, tok, long_ids))
    except KeyboardInterrupt:  # a time limit (gpu.sh under timeout -s INT): the table of what ran
        add_row("parity", "interrupted", "-", "-", "-", False)
    print_table()
    json.dump({"rows": rows, "failures": failures}, open(os.path.join(work, "parity.json"), "w"))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
