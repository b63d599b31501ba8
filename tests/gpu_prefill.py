"""GPU checks and timings of the prefill launchers (kernels.h): matmul_gpu and matmul_simple_gpu,
lm_head_loss_gpu, swiglu_gpu, qk_norm_rope_batch_gpu, attention_prefill_gpu.

Runs on the GPU machine, from the repo root: python3 tests/gpu_prefill.py [PART ...] (the names of
main()'s parts, e.g. check_attention time_attention; all by default)
Builds build/libkernels.so (make), calls it through ctypes on
torch tensors, and compares with torch float64 references on the same rounded inputs.

Thresholds (relative L2 error):
  matmul (both kernels), 16-bit weights, x in w's type (kernels.h: matmul_input_dtype), vs float64 of
    the same x and w: 1e-4 (only fp32 accumulation order differs)
  lm_head_loss (both kernels) vs float64 logsumexp(x . w) - (x . w)[target] on the same inputs: 1e-5
    (fp32 logits, sums of exponentials in fp32); NaN exactly where the target is out of range, and in
    every row when a weight is NaN
  matmul, int8 (Q8_0) weights, dequantized to bf16 on the way to the tensor cores, x in bf16:
    vs float64 of bf16(x) . bf16(float32(q) * float32(scale)): 1e-4 (as the 16-bit weights); vs float64
    of the fp32 x and the exact dequantized weights: 6e-3 (two independent bf16 roundings, x's and w's,
    each of rms relative error 1.7e-3: 2.4e-3 expected; 2.5x that, on cases of >= 256 outputs)
  matmul, fp32 weights: 1e-6; swiglu 1e-6; q after norm + RoPE 1e-5
  cache rows written by qk_norm_rope_batch vs the float64 reference rounded to the cache type:
    2e-3 bf16, 3e-4 fp16 (a tie may round the other way); rows outside pos0..pos0+T-1 unchanged
  qkv_rope_matmul (the product with QK-norm, RoPE and the stores fused, and the chain) vs float64 of the same
    rounded x and w: q stored and the cache rows within the bounds above + 1e-4 (the product's fp32 error)
  attention, tensor cores: 5e-3 bf16, 1e-3 fp16 (P is rounded to 16 bits for P V, the reference
    keeps it in float64); CUDA-core fallback 1e-4
Timings: CUDA events, median over reps of batches of calls, after warm-up. SDPA shapes (B,H,S,D)
are run by our launcher as one sequence of B*H heads (same FLOPs, our cache layout).
Prints one table last; exits non-zero on any correctness failure.
"""
import ctypes
import math
import os
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F

from q8_reference import dequant, q8_0  # tests/, the script's folder, is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.environ.get("KERNELS_LIB") or os.path.join(ROOT, "build", "libkernels.so")  # as gpu_kernels.py
DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}  # int8: Q8_0, with its scales
NAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int8: "int8"}

torch.backends.cuda.matmul.allow_tf32 = False
torch.set_grad_enabled(False)
dev = torch.device("cuda")
rows, failures = [], []
int8_ran = False  # check_matmul_int8 got through: int8 is timed too


def build():
    if not os.environ.get("KERNELS_LIB"):
        subprocess.run(["make", "-s", "build/libkernels.so"], cwd=ROOT, check=True)
    lib = ctypes.CDLL(LIB)
    P, I, Fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.matmul_gpu.argtypes = [P, P, P, I, P, P, I, I, I, I, P]
    lib.matmul_simple_gpu.argtypes = [P, P, P, I, P, P, I, I, I, I, P]
    lib.lm_head_loss_scratch_floats.argtypes = [I, I]
    lib.lm_head_loss_scratch_floats.restype = ctypes.c_size_t
    lib.lm_head_loss_gpu.argtypes = [P, P, P, I, P, P, I, I, I, P, I, P]
    lib.swiglu_gpu.argtypes = [P, I, P, I, I, P]
    lib.cross_entropy_gpu.argtypes = [P, P, P, I, I, P]
    lib.swiglu_matmul_gpu.argtypes = [P, P, P, I, P, I, I, I, P, I, P]
    lib.qk_norm_rope_batch_gpu.argtypes = [P, P, P, P, Fl, P, P, I, I, I, I, I, I, Fl, Fl, P]
    lib.qkv_rope_matmul_gpu.argtypes = [P, P, P, I, P, P, P, P, Fl, P, P, I, P, I, I, I, I, I, I, Fl, Fl, P, I, P]
    lib.rope_table_gpu.argtypes = [P, I, I, I, Fl, P]
    lib.attention_prefill_gpu.argtypes = [P, I, P, P, P, I, I, I, I, I, I, Fl, P]
    for f in (lib.matmul_gpu, lib.matmul_simple_gpu, lib.lm_head_loss_gpu, lib.swiglu_gpu, lib.swiglu_matmul_gpu,
              lib.cross_entropy_gpu,
              lib.qk_norm_rope_batch_gpu, lib.qkv_rope_matmul_gpu, lib.rope_table_gpu, lib.attention_prefill_gpu):
        f.restype = None
    return lib


lib = build()
STREAM = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def rel(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm()).item()


def check(case, err, tol, ours_us=None, torch_us=None):
    ok = err <= tol
    if not ok:
        failures.append(f"{case}: rel err {err:.3e} > {tol:.0e}")
    rows.append((case, err, tol, ours_us, torch_us))


def bench(fn, inner=10, reps=30):
    """median microseconds per call: events around batches of `inner` calls, after warm-up"""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / inner)
    times.sort()
    return times[len(times) // 2]


# ---- matmul ------------------------------------------------------------------------------------

ACT = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16,
       torch.int8: torch.bfloat16}  # the type of x for w's type: kernels.h, matmul_input_dtype
PATHS = (("tma", lib.matmul_gpu), ("simple", lib.matmul_simple_gpu))


def matmul(out, w, x, bias, accumulate, scales=None, fn=lib.matmul_gpu):
    T, cols = x.shape
    fn(p(out), p(w), p(scales), DT[w.dtype], p(x), p(bias), T, w.shape[0], cols, accumulate, STREAM)


def check_matmul(gen):
    # T, rows, cols: tails in every dimension (tokens past 128, rows past the tile, k past 64); 128-row
    # and 256-row tiles of the TMA kernel (it picks 256 where they fill the GPU: 2048x4096, 1100x10008,
    # the LM head)
    cases = [(1, 8, 8), (37, 136, 40), (130, 264, 1000), (257, 1000, 72), (2048, 4096, 1024), (5, 151936, 1024),
             (1100, 10008, 328)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for path, fn in PATHS:
            if dtype == torch.float32 and path == "simple":
                continue  # one fp32 kernel
            for i, (T, R, C) in enumerate(cases):
                if dtype == torch.float32 and R > 10000:
                    continue
                x = torch.randn(T, C, generator=gen, device=dev).to(ACT[dtype])
                w = (torch.randn(R, C, generator=gen, device=dev) / math.sqrt(C)).to(dtype)
                bias = torch.randn(R, generator=gen, device=dev) if i % 2 else None
                accumulate = i % 3 == 1
                prev = torch.randn(T, R, generator=gen, device=dev)
                out = prev.clone() if accumulate else torch.full((T, R), float("nan"), device=dev)
                matmul(out, w, x, bias, int(accumulate), fn=fn)
                torch.cuda.synchronize()
                base = (prev.double() if accumulate else 0) + (bias.double() if bias is not None else 0)
                ref = base + x.double() @ w.double().T
                case = (f"matmul {path} {NAME[dtype]} T={T} {R}x{C}{' +bias' if bias is not None else ''}"
                        f"{' +=' if accumulate else ''}")
                check(case, rel(out, ref), 1e-6 if dtype == torch.float32 else 1e-4)


def check_matmul_int8(gen):
    """int8 weights quantized by q8_0: cols multiples of 32 (not all of 64 or 256: 96, 4864, 896, 992), a zero
    block (scale 0), bias and accumulate as check_matmul's. Sets int8_ran when it got through (time_matmul then
    times int8 too)."""
    global int8_ran
    cases = [(1, 8, 32), (37, 136, 96), (130, 264, 992), (257, 1000, 4864), (64, 1152, 896), (2048, 4096, 1024),
             (5, 151936, 1024)]
    for i, (T, R, C) in enumerate(cases):
        x = torch.randn(T, C, generator=gen, device=dev)
        wf = torch.randn(R, C, generator=gen, device=dev) / math.sqrt(C)
        wf[0, :32] = 0.0
        q, sc = q8_0(wf)
        wd = dequant(q, sc)
        bias = torch.randn(R, generator=gen, device=dev) if i % 2 else None
        accumulate = i % 3 == 1
        prev = torch.randn(T, R, generator=gen, device=dev)
        out = prev.clone() if accumulate else torch.full((T, R), float("nan"), device=dev)
        xb = x.to(torch.bfloat16)
        matmul(out, q, xb, bias, int(accumulate), sc)
        torch.cuda.synchronize()
        base = (prev.double() if accumulate else 0) + (bias.double() if bias is not None else 0)
        ref_r = base + xb.double() @ wd.to(torch.bfloat16).double().T
        ref_x = base + x.double() @ wd.double().T
        case = f"matmul int8 T={T} {R}x{C}{' +bias' if bias is not None else ''}{' +=' if accumulate else ''}"
        check(case + " (bf16 x, bf16 dequantized w)", rel(out, ref_r), 1e-4)
        if T * R >= 256:  # the rel-L2 of fewer outputs is too noisy for a bound from the roundings' rms
            check(case + " (fp32 x, exact w)", rel(out, ref_x), 6e-3)
    int8_ran = True


# ---- the LM head fused with the cross entropy ----------------------------------------------------

def lm_head_loss(nll, w, x, targets, scales=None, simple=False):
    T, D = x.shape
    V = w.shape[0]
    scratch = torch.empty(lib.lm_head_loss_scratch_floats(T, V), device=dev)
    lib.lm_head_loss_gpu(p(nll), p(w), p(scales), DT[w.dtype], p(x), p(targets), T, V, D, p(scratch), int(simple),
                         STREAM)


def check_lm_head_loss(gen):
    """nll of random rows against float64; targets -1 and vocab give NaN; a NaN weight gives NaN everywhere"""
    cases = [(37, 1000, 64, torch.bfloat16), (300, 151936, 1024, torch.bfloat16), (130, 5000, 256, torch.float16),
             (64, 1152, 896, torch.int8), (1100, 10008, 328, torch.bfloat16)]
    for T, V, D, dtype in cases:
        for simple in (False, True):
            x = torch.randn(T, D, generator=gen, device=dev).to(ACT[dtype])
            wf = torch.randn(V, D, generator=gen, device=dev) * (3 / math.sqrt(D))  # logits of spread ~3
            if dtype == torch.int8:
                w, sc = q8_0(wf)
                w_ref = dequant(w, sc).to(torch.bfloat16)
            else:
                w, sc = wf.to(dtype), None
                w_ref = w
            targets = torch.randint(0, V, (T,), generator=gen, device=dev, dtype=torch.int32)
            targets[0], targets[1] = -1, V
            nll = torch.full((T,), float("nan"), device=dev)
            lm_head_loss(nll, w, x, targets, sc, simple)
            torch.cuda.synchronize()
            logits = x.double() @ w_ref.double().T
            ref = logits.logsumexp(-1) - logits.gather(1, targets.clamp(0, V - 1).long()[:, None])[:, 0]
            ok_rows = torch.ones(T, dtype=torch.bool, device=dev)
            ok_rows[:2] = False
            case = f"lm_head_loss {'simple' if simple else 'tma'} {NAME[dtype]} T={T} V={V} D={D}"
            check(case, rel(nll[ok_rows], ref[ok_rows]), 1e-5)
            check(case + ": NaN for targets -1, V", 0.0 if bool(nll[:2].isnan().all()) else math.inf, 0.0)
    for simple in (False, True):  # a NaN weight: every row's logits hold a NaN
        T, V, D = 20, 600, 64
        x = torch.randn(T, D, generator=gen, device=dev).to(torch.bfloat16)
        w = torch.randn(V, D, generator=gen, device=dev).to(torch.bfloat16)
        w[517, 3] = float("nan")
        targets = torch.randint(0, V, (T,), generator=gen, device=dev, dtype=torch.int32)
        nll = torch.zeros(T, device=dev)
        lm_head_loss(nll, w, x, targets, None, simple)
        torch.cuda.synchronize()
        check(f"lm_head_loss {'simple' if simple else 'tma'}: a NaN weight makes every row NaN",
              0.0 if bool(nll.isnan().all()) else math.inf, 0.0)


def check_swiglu(gen):
    for T, H in ((1, 8), (33, 3072)):
        gu = torch.randn(T, 2 * H, generator=gen, device=dev) * 3
        g, u = gu.double()[:, :H], gu.double()[:, H:]
        for dtype in (torch.float32, torch.bfloat16):
            h = torch.full((T, H), float("nan"), device=dev, dtype=dtype)
            lib.swiglu_gpu(p(h), DT[dtype], p(gu), T, H, STREAM)
            torch.cuda.synchronize()
            check(f"swiglu T={T} hidden={H} {NAME[dtype]}", rel(h, F.silu(g) * u),
                  1e-6 if dtype == torch.float32 else 2 ** -8)  # bf16: one rounding


def swiglu_matmul(h, w, x, hidden, scales=None, simple=False):
    T, D = x.shape
    gate_up = torch.empty(T, 2 * hidden, device=dev)
    lib.swiglu_matmul_gpu(p(h), p(w), p(scales), DT[w.dtype], p(x), T, hidden, D, p(gate_up), int(simple), STREAM)


def check_swiglu_matmul(gen):
    """h = silu(x . gate^T) * (x . up^T) in x's type: the TMA product with SwiGLU in its epilogue (paired tiles
    of 128 gate and 128 up rows; hidden units past a multiple of 128 masked) and the chain (simple product,
    swiglu_gpu), against float64 of the same inputs: one rounding of h (2^-8 bf16, 2^-11 fp16) + 1e-4"""
    for T, H, D in ((37, 96, 64), (2048, 3072, 1024), (130, 4864, 896), (300, 200, 328)):
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(T, D, generator=gen, device=dev).to(dtype)
            w = (torch.randn(2 * H, D, generator=gen, device=dev) * (2 / math.sqrt(D))).to(dtype)
            g = x.double() @ w[:H].double().T
            ref = g * torch.sigmoid(g) * (x.double() @ w[H:].double().T)
            for simple in (False, True):
                h = torch.full((T, H), float("nan"), device=dev, dtype=dtype)
                swiglu_matmul(h, w, x, H, None, simple)
                torch.cuda.synchronize()
                tol = 1e-4 + (2 ** -8 if dtype == torch.bfloat16 else 2 ** -11)
                check(f"swiglu_matmul {'simple' if simple else 'tma, fused'} {NAME[dtype]} T={T} hidden={H} dim={D}",
                      rel(h, ref), tol)


# ---- qk_norm + RoPE + cache store --------------------------------------------------------------

def rope_ref(x, w, pos, theta, eps):
    """x (T, heads, hd) float64; transformers' fp32 inv_freq and angle, cos/sin of that angle in float64"""
    hd = x.shape[-1]
    if w is not None:
        x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # CPU fp32, as HF
    angle = (pos.float().cpu()[:, None] * inv_freq[None, :]).to(dev).double()[:, None, :]
    c, s = angle.cos(), angle.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def check_cache(case, kc, vc, kc0, vc0, k_ref, v_ref, pos0, ctol):
    """cache rows pos0.. (k_ref, v_ref float64 (T, kv heads, hd)) against the references rounded to the cache
    type; the other rows as they were (kc0, vc0)"""
    T = k_ref.shape[0]
    check(case + " k cache", rel(kc[pos0: pos0 + T], k_ref.to(kc.dtype)), ctol)
    check(case + " v cache", rel(vc[pos0: pos0 + T], v_ref.to(vc.dtype)), ctol)
    outside = torch.ones(kc.shape[0], dtype=torch.bool, device=dev)
    outside[pos0: pos0 + T] = False
    same = torch.equal(kc[outside], kc0[outside]) and torch.equal(vc[outside], vc0[outside])
    check(case + " other rows untouched", 0.0 if same else math.inf, 0.0)


def check_rope(gen):
    cases = [  # T, pos0, heads, kv heads, hd, norms, k_scale, cache dtype
        (37, 100, 16, 8, 128, True, 1.0, torch.bfloat16),
        (64, 30000, 16, 8, 128, True, 4.0, torch.float16),
        (19, 0, 14, 2, 64, False, 1.0, torch.bfloat16),
    ]
    theta, eps = 1e6, 1e-6
    for T, pos0, nh, nkv, hd, norms, k_scale, kvt in cases:
        seq = pos0 + T + 8
        qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=gen, device=dev) * 2
        qn = torch.rand(hd, generator=gen, device=dev) * 2 + 0.5 if norms else None
        kn = torch.rand(hd, generator=gen, device=dev) * 2 + 0.5 if norms else None
        if norms:
            kn[3] = 96.5  # Qwen3-0.6B layer 0's outlier gain
        kc = torch.randn(seq, nkv, hd, generator=gen, device=dev).to(kvt)
        vc = torch.randn(seq, nkv, hd, generator=gen, device=dev).to(kvt)
        kc0, vc0, x0 = kc.clone(), vc.clone(), qkv.double()
        q_out = torch.full((T, nh * hd), float("nan"), device=dev, dtype=kvt)
        lib.qk_norm_rope_batch_gpu(p(q_out), p(qkv), p(qn), p(kn), k_scale, p(kc), p(vc), DT[kvt], pos0, T, nh, nkv,
                                   hd, theta, eps, STREAM)
        torch.cuda.synchronize()
        pos = torch.arange(pos0, pos0 + T, device=dev)
        q_ref = rope_ref(x0[:, : nh * hd].view(T, nh, hd), qn, pos, theta, eps)
        k_ref = rope_ref(x0[:, nh * hd: (nh + nkv) * hd].view(T, nkv, hd), kn, pos, theta, eps)
        v_ref = x0[:, (nh + nkv) * hd:].view(T, nkv, hd)
        case = f"qk_norm_rope {NAME[kvt]} T={T} pos0={pos0} {nh}:{nkv} hd={hd}{'' if norms else ' no-norm'}"
        check(case + " q", rel(qkv[:, : nh * hd].view(T, nh, hd), q_ref), 1e-5)
        check(case + " k", rel(qkv[:, nh * hd: (nh + nkv) * hd].view(T, nkv, hd), k_ref), 1e-5)
        ctol = 2e-3 if kvt == torch.bfloat16 else 3e-4
        check(case + " q stored", rel(q_out.view(T, nh, hd), q_ref.to(kvt)), ctol)
        check_cache(case, kc, vc, kc0, vc0, k_ref / k_scale, v_ref, pos0, ctol)


def check_qkv_rope_matmul(gen):
    """qkv_rope_matmul_gpu: the qkv product with QK-norm, RoPE and the stores in the TMA product's epilogue
    (int8: the simple kernel's; fp32 and head dims other than 64 and 128: the chain), and the chain
    (simple product, qk_norm_rope_batch_gpu), against float64 of the same rounded x and w: q stored, k / k_scale
    and v in the cache rows pos0.., within the cache bounds of check_rope; other cache rows untouched"""
    cases = [  # T, pos0, heads, kv heads, hd, dim, w dtype, cache dtype, norms, bias, k_scale
        (300, 5, 16, 8, 128, 1024, torch.bfloat16, torch.bfloat16, True, False, 1.0),   # Qwen3-0.6B heads
        (130, 4000, 32, 8, 128, 512, torch.float16, torch.float16, True, False, 4.0),   # GQA 4:1, far positions
        (77, 0, 4, 2, 64, 256, torch.bfloat16, torch.bfloat16, True, False, 2.0),       # the demo's heads
        (129, 1000, 14, 2, 64, 896, torch.bfloat16, torch.float16, False, True, 1.0),   # Qwen2.5-0.5B: bias, no norms
        (64, 3, 16, 8, 128, 1024, torch.int8, torch.bfloat16, True, False, 1.0),        # int8 weights
        (20, 7, 4, 2, 64, 128, torch.float32, torch.bfloat16, True, True, 1.0),         # fp32 weights: the chain
        (10, 2, 8, 4, 32, 64, torch.bfloat16, torch.bfloat16, True, False, 1.0),        # head_dim 32: the chain
    ]
    theta, eps = 1e6, 1e-6
    for T, pos0, nh, nkv, hd, D, wt, kvt, norms, has_bias, k_scale in cases:
        R, seq = (nh + 2 * nkv) * hd, pos0 + T + 8
        x = torch.randn(T, D, generator=gen, device=dev).to(ACT[wt])
        w32 = torch.randn(R, D, generator=gen, device=dev) * (2 / math.sqrt(D))
        scales = None
        if wt == torch.int8:
            w, scales = q8_0(w32)
            w_ref = dequant(w, scales).to(torch.bfloat16)  # what the tensor cores see
        else:
            w = w_ref = w32.to(wt)
        bias = torch.randn(R, generator=gen, device=dev) if has_bias else None
        qn = torch.rand(hd, generator=gen, device=dev) * 2 + 0.5 if norms else None
        kn = torch.rand(hd, generator=gen, device=dev) * 2 + 0.5 if norms else None
        if norms:
            kn[3] = 96.5  # Qwen3-0.6B layer 0's outlier gain
        y = x.double() @ w_ref.double().T + (bias.double() if has_bias else 0)
        pos = torch.arange(pos0, pos0 + T, device=dev)
        q_ref = rope_ref(y[:, : nh * hd].view(T, nh, hd), qn, pos, theta, eps)
        k_ref = rope_ref(y[:, nh * hd: (nh + nkv) * hd].view(T, nkv, hd), kn, pos, theta, eps)
        v_ref = y[:, (nh + nkv) * hd:].view(T, nkv, hd)
        ctol = (2e-3 if kvt == torch.bfloat16 else 3e-4) + 1e-4
        for simple in (False, True):
            kc = torch.randn(seq, nkv, hd, generator=gen, device=dev).to(kvt)
            vc = torch.randn(seq, nkv, hd, generator=gen, device=dev).to(kvt)
            kc0, vc0 = kc.clone(), vc.clone()
            q_out = torch.full((T, nh * hd), float("nan"), device=dev, dtype=kvt)
            qkv, rope = torch.empty(T, R, device=dev), torch.empty(T, hd // 2, 2, device=dev)
            lib.rope_table_gpu(p(rope), pos0, T, hd, theta, STREAM)
            lib.qkv_rope_matmul_gpu(p(q_out), p(w), p(scales), DT[wt], p(x), p(bias), p(qn), p(kn), k_scale, p(kc),
                                    p(vc), DT[kvt], p(rope), pos0, T, nh, nkv, hd, D, theta, eps, p(qkv), int(simple),
                                    STREAM)
            torch.cuda.synchronize()
            fused = not simple and wt != torch.float32 and hd in (64, 128)
            case = (f"qkv_rope_matmul {'fused' if fused else 'chain'} w {NAME[wt]} cache {NAME[kvt]} T={T} pos0={pos0} "
                    f"{nh}:{nkv} hd={hd} dim={D}{'' if norms else ' no-norm'}{' bias' if has_bias else ''}")
            check(case + " q", rel(q_out.view(T, nh, hd), q_ref.to(kvt)), ctol)
            check_cache(case, kc, vc, kc0, vc0, k_ref / k_scale, v_ref, pos0, ctol)


# ---- attention ---------------------------------------------------------------------------------

def make_attention(gen, T, pos0, nh, nkv, hd, kvt, q_gain=1.0):
    """queries (T, nh * hd) in the cache type, and a cache whose rows 0..pos0+T-1 hold random K/V and whose
    later rows hold NaN"""
    seq = pos0 + T + 16
    q = (torch.randn(T, nh * hd, generator=gen, device=dev) * q_gain).to(kvt)
    kc = torch.randn(seq, nkv, hd, generator=gen, device=dev).to(kvt)
    vc = torch.randn(seq, nkv, hd, generator=gen, device=dev).to(kvt)
    kc[pos0 + T:] = float("nan")
    vc[pos0 + T:] = float("nan")
    return q, kc, vc


def attention(out, q, kc, vc, pos0, T, nh, nkv, hd, scale):
    lib.attention_prefill_gpu(p(out), DT[out.dtype], p(q), p(kc), p(vc), DT[kc.dtype], pos0, T, nh, nkv, hd, scale,
                              STREAM)


def attention_ref(q, kc, vc, pos0, T, nh, nkv, hd, scale):
    q = q.view(T, nh, hd).double().transpose(0, 1)  # (nh, T, hd)
    n = pos0 + T
    k = kc[:n].double().transpose(0, 1).repeat_interleave(nh // nkv, 0)  # (nh, n, hd)
    v = vc[:n].double().transpose(0, 1).repeat_interleave(nh // nkv, 0)
    s = q @ k.transpose(1, 2) * scale
    mask = torch.arange(n, device=dev)[None, :] > (pos0 + torch.arange(T, device=dev))[:, None]
    s = s.masked_fill(mask, -math.inf)
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(T, nh * hd)


def check_attention(gen):
    cases = [  # T, pos0, heads, kv heads, hd, cache dtype, q gain
        (512, 0, 8, 8, 64, torch.bfloat16, 1.0),      # SDPA (1,8,512,64)
        (2048, 0, 16, 16, 64, torch.bfloat16, 1.0),   # SDPA (2,8,2048,64)
        (2048, 0, 16, 16, 128, torch.bfloat16, 1.0),  # SDPA (2,8,2048,128)
        (200, 0, 16, 8, 128, torch.bfloat16, 3.0),    # GQA 2:1, Qwen3-0.6B heads, peaked softmax
        (100, 37, 32, 8, 128, torch.bfloat16, 1.0),   # GQA 4:1
        (77, 300, 14, 2, 64, torch.bfloat16, 1.0),    # GQA 7:1, Qwen2.5-0.5B heads
        (65, 1000, 16, 8, 128, torch.bfloat16, 1.0),  # pre-filled cache, T not a tile multiple
        (1, 50, 16, 8, 128, torch.bfloat16, 1.0),     # one token
        (300, 129, 16, 8, 128, torch.float16, 1.0),
        (131, 5, 14, 2, 64, torch.float16, 2.0),
        (70, 10, 8, 4, 32, torch.bfloat16, 1.0),      # CUDA-core fallback head dims
        (33, 7, 6, 2, 96, torch.float16, 1.0),
        (40, 20, 4, 4, 256, torch.bfloat16, 1.0),
        (25, 3, 4, 1, 8, torch.bfloat16, 1.0),
    ]
    out_types = (torch.float32, torch.bfloat16, torch.float16)  # the output as the o_proj product reads it
    out_rounding = {torch.float32: 0.0, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
    for i, (T, pos0, nh, nkv, hd, kvt, gain) in enumerate(cases):
        q, kc, vc = make_attention(gen, T, pos0, nh, nkv, hd, kvt, gain)
        scale = 1.0 / math.sqrt(hd)
        ot = out_types[i % 3]
        out = torch.full((T, nh * hd), float("nan"), device=dev, dtype=ot)
        attention(out, q, kc, vc, pos0, T, nh, nkv, hd, scale)
        torch.cuda.synchronize()
        ref = attention_ref(q, kc, vc, pos0, T, nh, nkv, hd, scale)
        tol = 1e-4 if hd not in (64, 128) else (5e-3 if kvt == torch.bfloat16 else 1e-3)
        check(f"attention {NAME[kvt]} T={T} pos0={pos0} {nh}:{nkv} hd={hd} to {NAME[ot]}", rel(out, ref),
              tol + out_rounding[ot])


# ---- timings -----------------------------------------------------------------------------------

def time_matmul(gen):
    """bf16 products of the 0.6B and 8B shapes at 512, 2048 and 8192 tokens (the LM head at 2048): the TMA
    kernel, the simple one, and cuBLAS (F.linear, bf16 out: half the bytes of our fp32 out); then int8
    weights on the 0.6B shapes at 2048 (torch: F.linear on their bf16 dequantized values)"""
    shapes = {"0.6B": (("qkv", 4096, 1024), ("o_proj", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072),
                       ("lm_head", 151936, 1024)),
              "8B": (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 24576, 4096), ("down", 4096, 12288),
                     ("lm_head", 151936, 4096))}
    for model, mats in shapes.items():
        for T in (512, 2048, 8192):
            for name, R, C in mats:
                if name == "lm_head" and T != 2048:
                    continue
                xb = torch.randn(T, C, generator=gen, device=dev).to(torch.bfloat16)
                w = (torch.randn(R, C, generator=gen, device=dev) / math.sqrt(C)).to(torch.bfloat16)
                out = torch.empty(T, R, device=dev)
                big = 2 * T * R * C > 1e12
                inner, reps = (3, 10) if big else (10, 30)
                simple = bench(lambda: matmul(out, w, xb, None, 0, fn=lib.matmul_simple_gpu), inner, reps)
                ours = bench(lambda: matmul(out, w, xb, None, 0), inner, reps)
                ref = bench(lambda: F.linear(xb, w), inner, reps)
                err = rel(out, F.linear(xb.float(), w.float()))  # fp32 (tf32 off): far under the 1e-4 bound
                tf = lambda us: 2 * T * R * C / us / 1e6  # noqa: E731
                check(f"time matmul {model} {name} T={T} {R}x{C} [TFLOP/s: tma {tf(ours):.0f}, simple {tf(simple):.0f}, "
                      f"cuBLAS {tf(ref):.0f}]", err, 1e-4, ours, ref)
                del out
    if not int8_ran:  # a fault of the int8 kernel is reported by check_matmul_int8, not again here
        return
    T = 2048
    for name, R, C in shapes["0.6B"]:
        xb = torch.randn(T, C, generator=gen, device=dev).to(torch.bfloat16)
        w = (torch.randn(R, C, generator=gen, device=dev) / math.sqrt(C)).to(torch.bfloat16)
        out = torch.empty(T, R, device=dev)
        ours = bench(lambda: matmul(out, w, xb, None, 0))
        q, sc = q8_0(w.float())
        wb = dequant(q, sc).to(torch.bfloat16)
        ours8 = bench(lambda: matmul(out, q, xb, None, 0, sc))
        ref8 = bench(lambda: F.linear(xb, wb))
        err = rel(out, xb.double() @ wb.double().T)
        check(f"time matmul int8 {name} T={T} {R}x{C} [ours {2 * T * R * C / ours8 / 1e6:.0f} TFLOP/s, "
              f"{ours8 / ours:.2f}x the bf16 time]", err, 1e-4, ours8, ref8)


def time_lm_head_loss(gen):
    """perplexity's LM head at run.c's 1024-token chunk: fused with the cross entropy, against the logits
    through memory (our product + cross_entropy_gpu; torch: F.linear + F.cross_entropy)"""
    T, V = 1024, 151936
    for D in (1024, 4096):
        xb = torch.randn(T, D, generator=gen, device=dev).to(torch.bfloat16)
        w = (torch.randn(V, D, generator=gen, device=dev) * (3 / math.sqrt(D))).to(torch.bfloat16)
        targets = torch.randint(0, V, (T,), generator=gen, device=dev, dtype=torch.int32)
        nll, nll2 = torch.empty(T, device=dev), torch.empty(T, device=dev)
        logits = torch.empty(T, V, device=dev)
        scratch = torch.empty(lib.lm_head_loss_scratch_floats(T, V), device=dev)
        fused = bench(lambda: lib.lm_head_loss_gpu(p(nll), p(w), None, DT[w.dtype], p(xb), p(targets), T, V, D,
                                                   p(scratch), 0, STREAM), 3, 10)

        def unfused():
            matmul(logits, w, xb, None, 0)
            lib.cross_entropy_gpu(p(nll2), p(logits), p(targets), T, V, STREAM)
        through_memory = bench(unfused, 3, 10)
        ref = bench(lambda: F.cross_entropy(F.linear(xb, w).float(), targets.long(), reduction="none"), 3, 10)
        err = rel(nll, nll2)
        check(f"time lm_head_loss T={T} V={V} D={D} [logits through memory {through_memory:.0f} us]", err, 1e-5,
              fused, ref)


def time_attention(gen):
    shapes = [(1, 8, 512, 64), (2, 8, 2048, 64), (2, 8, 2048, 128)] + [(16, H, 512, 64) for H in (8, 16, 32, 64, 96, 128)]
    for B, H, S, D in shapes:
        nh = B * H
        qs, kc, vc = make_attention(gen, S, 0, nh, nh, D, torch.bfloat16)
        kc, vc = kc[:S].contiguous(), vc[:S].contiguous()
        scale = 1.0 / math.sqrt(D)
        out = torch.empty(S, nh * D, device=dev)
        ours = bench(lambda: attention(out, qs, kc, vc, 0, S, nh, nh, D, scale))
        q = qs.view(S, B, H, D).permute(1, 2, 0, 3).contiguous()
        k = kc.view(S, B, H, D).permute(1, 2, 0, 3).contiguous()
        v = vc.view(S, B, H, D).permute(1, 2, 0, 3).contiguous()
        causal = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        full = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=False))
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        err = rel(out.view(S, B, H, D).permute(1, 2, 0, 3), ref)
        flop = 4 * B * H * S * S * D / 2
        check(f"time attention causal ({B},{H},{S},{D}) [ours {flop / ours / 1e6:.0f} TFLOP/s; "
              f"sdpa full {full:.1f} us]", err, 5e-3, ours, causal)
    nh, nkv, D = 16, 8, 128  # the 0.6B's own heads; SDPA gets K/V repeated per query head (same FLOPs)
    for S in (2048, 8192, 32768):
        qs, kc, vc = make_attention(gen, S, 0, nh, nkv, D, torch.bfloat16)
        kc, vc = kc[:S].contiguous(), vc[:S].contiguous()
        scale = 1.0 / math.sqrt(D)
        out = torch.empty(S, nh * D, device=dev, dtype=torch.bfloat16)
        inner, reps = (1, 5) if S > 8192 else (3, 10)
        ours = bench(lambda: attention(out, qs, kc, vc, 0, S, nh, nkv, D, scale), inner, reps)
        q = qs.view(S, nh, D).transpose(0, 1)[None].contiguous()
        k = kc.transpose(0, 1).repeat_interleave(nh // nkv, 0)[None].contiguous()
        v = vc.transpose(0, 1).repeat_interleave(nh // nkv, 0)[None].contiguous()
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), inner, reps)
        if S <= 2048:  # float64 reference; beyond, SDPA's own bf16 output (its error is ~4e-3)
            err, tol = rel(out, attention_ref(qs, kc, vc, 0, S, nh, nkv, D, scale)), 5e-3 + 2 ** -8
        else:
            sdpa_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1).reshape(S, nh * D)
            err, tol = rel(out, sdpa_out), 1e-2
        flop = 4 * nh * S * S * D / 2
        check(f"time attention causal GQA {nh}:{nkv} S={S} D={D} [ours {flop / ours / 1e6:.0f} TFLOP/s]", err, tol,
              ours, sdpa)


def time_layer(gen):
    """one Qwen3-0.6B layer at T=2048 with our kernels (RMSNorms excluded), x 28 + LM head"""
    T, D, Hd, nh, nkv, hd, L, V = 2048, 1024, 3072, 16, 8, 128, 28, 151936
    qd, QKV = nh * hd, (nh + 2 * nkv) * hd
    bf = torch.bfloat16
    w_qkv = (torch.randn(QKV, D, generator=gen, device=dev) / 32).to(bf)
    w_o = (torch.randn(D, qd, generator=gen, device=dev) / 45).to(bf)
    w_gu = (torch.randn(2 * Hd, D, generator=gen, device=dev) / 32).to(bf)
    w_d = (torch.randn(D, Hd, generator=gen, device=dev) / 55).to(bf)
    w_lm = (torch.randn(V, D, generator=gen, device=dev) / 32).to(bf)
    qn = torch.rand(hd, generator=gen, device=dev) + 0.5
    kn = torch.rand(hd, generator=gen, device=dev) + 0.5
    xb = torch.randn(T, D, generator=gen, device=dev).to(bf)
    x = torch.randn(T, D, generator=gen, device=dev)
    qkv, att = torch.empty(T, QKV, device=dev), torch.empty(T, qd, device=dev, dtype=bf)
    q = torch.empty(T, qd, device=dev, dtype=bf)
    rope = torch.empty(T, hd // 2, 2, device=dev)
    lib.rope_table_gpu(p(rope), 0, T, hd, 1e6, STREAM)
    gu, h = torch.empty(T, 2 * Hd, device=dev), torch.empty(T, Hd, device=dev, dtype=bf)
    kc = torch.empty(T, nkv, hd, device=dev, dtype=bf)
    vc = torch.empty(T, nkv, hd, device=dev, dtype=bf)
    logits = torch.empty(1, V, device=dev)
    targets = torch.randint(0, V, (T,), generator=gen, device=dev, dtype=torch.int32)
    nll = torch.empty(T, device=dev)
    scratch = torch.empty(lib.lm_head_loss_scratch_floats(T, V), device=dev)
    parts = {}

    def qkv_rope(simple):
        lib.qkv_rope_matmul_gpu(p(q), p(w_qkv), None, DT[bf], p(xb), None, p(qn), p(kn), 1.0, p(kc), p(vc), DT[bf],
                                p(rope), 0, T, nh, nkv, hd, D, 1e6, 1e-6, p(qkv), int(simple), STREAM)

    def layer(fn):
        simple = fn == lib.matmul_simple_gpu
        qkv_rope(simple)
        attention(att, q, kc, vc, 0, T, nh, nkv, hd, 1.0 / math.sqrt(hd))
        matmul(x, w_o, att, None, 1, fn=fn)
        lib.swiglu_matmul_gpu(p(h), p(w_gu), None, DT[bf], p(xb), T, Hd, D, p(gu), int(simple), STREAM)
        matmul(x, w_d, h, None, 1, fn=fn)

    for path, fn in PATHS:
        parts[path] = bench(lambda: layer(fn), inner=5, reps=20)
    parts["attention"] = bench(lambda: attention(att, q, kc, vc, 0, T, nh, nkv, hd, 1.0 / math.sqrt(hd)))
    parts["qkv"] = bench(lambda: matmul(qkv, w_qkv, xb, None, 0))
    parts["rope"] = bench(lambda: lib.qk_norm_rope_batch_gpu(p(q), p(qkv), p(qn), p(kn), 1.0, p(kc), p(vc), DT[bf], 0,
                                                             T, nh, nkv, hd, 1e6, 1e-6, STREAM))
    parts["qkv_rope"] = bench(lambda: qkv_rope(False))
    parts["swiglu_matmul"] = bench(lambda: lib.swiglu_matmul_gpu(p(h), p(w_gu), None, DT[bf], p(xb), T, Hd, D, p(gu),
                                                                 0, STREAM))
    head_last = bench(lambda: matmul(logits, w_lm, xb[:1], None, 0))
    head_loss = bench(lambda: lib.lm_head_loss_gpu(p(nll), p(w_lm), None, DT[bf], p(xb), p(targets), T, V, D,
                                                   p(scratch), 0, STREAM), inner=3, reps=10)
    for path in ("tma", "simple"):
        prefill_ms = (L * parts[path] + head_last) / 1e3
        ppl_ms = (L * parts[path] + head_loss) / 1e3
        print(f"Qwen3-0.6B T=2048, {path} products, RMSNorms excluded: layer {parts[path]:.0f} us (attention "
              f"{parts['attention']:.0f}, qkv product {parts['qkv']:.0f} + qk_norm_rope {parts['rope']:.0f} or fused "
              f"{parts['qkv_rope']:.0f}, fused gate_up + SwiGLU "
              f"{parts['swiglu_matmul']:.0f}); LM head last token {head_last:.0f} us, loss of all tokens {head_loss:.0f} us")
        print(f"  prefill {prefill_ms:.2f} ms = {T / prefill_ms:.0f}k tok/s; perplexity {ppl_ms:.2f} ms = "
              f"{T / ppl_ms:.0f}k tok/s")


def main():
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    print(torch.cuda.get_device_name(), torch.__version__)
    # int8 after the older checks: a fault there (a sticky CUDA error) cannot take their results with it
    parts = (check_matmul, check_lm_head_loss, check_swiglu, check_swiglu_matmul, check_rope, check_qkv_rope_matmul,
             check_attention, check_matmul_int8, time_matmul, time_lm_head_loss, time_attention, time_layer)
    chosen = sys.argv[1:]  # names of parts to run (all by default)
    unknown = set(chosen) - {part.__name__ for part in parts}
    if unknown:
        sys.exit(f"error: no part named {', '.join(sorted(unknown))}")
    for part in parts:
        if chosen and part.__name__ not in chosen:
            continue
        try:
            part(gen)
        except Exception as e:  # noqa: BLE001 (a part that raises is a failure; the others still run)
            traceback.print_exc()
            last = str(e).strip().splitlines()[-1][:100] if str(e).strip() else ""
            failures.append(f"{part.__name__} raised {type(e).__name__}: {last}")
    print(f"\n{'case':<100} {'rel err':>9} {'tol':>7} {'ours us':>9} {'torch us':>9} {'torch/ours':>10}")
    for case, err, tol, ours, ref in rows:
        t = f"{ours:9.1f} {ref:9.1f} {ref / ours:10.2f}" if ours is not None else ""
        flag = "" if err <= tol else "  FAIL"
        print(f"{case:<100} {err:9.2e} {tol:7.0e} {t}{flag}")
    if failures:
        print(f"\n{len(failures)} FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("\nall checks passed")


main()
