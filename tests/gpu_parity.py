"""GPU parity: ./run against Hugging Face transformers (float32), and against ./runcpu.

Runs on the GPU machine (torch + transformers), from the repo root, after `make run runcpu`:
    python3 tests/gpu_parity.py WORKDIR TEXT_FILE TOKENIZER_DIR
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
     qwen3-0.6b-4l-plain  qwen3-0.6b's shape, 4 layers, no k_norm outliers (for part 4 only)
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
from gen_fixtures import randomize  # noqa: E402
from text import split as demo_split  # noqa: E402  (demo/text.py: the demo's training / validation cut)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_grad_enabled(False)
N_POS, N_PROMPT, N_GREEDY = 320, 16, 64
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


def lookahead(name, checkpoint, prompt_text, tokenizer, steps, context):
    """Generate mode's greedy tokens (each step enqueued ahead, fed by the GPU's argmax) against logits
    mode's (fed by the host) on the prompt ids generate mode reports: equal, up to generate's stop."""
    r = subprocess.run(["./run", checkpoint, "-z", tokenizer, "-i", prompt_text, "-t", "0", "-n", str(steps),
                        "-c", str(context), "-v", "1"], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"generate failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    found = {k: [int(t) for t in v.split()] for k, v in re.findall(r"^(prompt|generated) ids:(.*)$", r.stderr, re.M)}
    prompt_ids, generated = found["prompt"], found.get("generated", [])
    host_fed = logits_run("./run", checkpoint, prompt_ids, steps, context, "bf16", 1)[1]
    ok = len(generated) > 0 and generated == host_fed[:len(generated)]
    add_row(name, "bf16 w, bf16 KV, fused, generate mode: steps enqueued ahead",
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


def random_model(name, seed, ids, prompt, text_path, tok):
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
    os.makedirs(work, exist_ok=True)
    text = open(text_file, encoding="utf-8").read()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    try:
        guarded("fixtures", "all", lambda: fixtures(tok, text))
        guarded("demo", "all", lambda: demo(text))
        text_ids = tok.encode(text[:20000])
        ids, prompt = text_ids[:N_POS], text_ids[1000:1000 + N_PROMPT]
        text_path = os.path.join(work, "text.txt")  # for ppl mode: the text of ids and a little more
        open(text_path, "w", encoding="utf-8").write(text[:2000])
        for seed, name in enumerate(MODELS, start=10):
            guarded(name, "all", lambda: random_model(name, seed, ids, prompt, text_path, tok))
    except KeyboardInterrupt:  # a time limit (gpu.sh under timeout -s INT): the table of what ran
        add_row("parity", "interrupted", "-", "-", "-", False)
    print_table()
    json.dump({"rows": rows, "failures": failures}, open(os.path.join(work, "parity.json"), "w"))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
