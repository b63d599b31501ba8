"""Speed of ./run against the memory-bandwidth floor and against Hugging Face, in one run.

Runs on the GPU machine from the repo root after `make run`:
    python3 tests/gpu_bench.py WORKDIR TEXT_FILE TOKENIZER_DIR [decode | prefill] [--against BUILD[,BUILD...]]
Prints one table last; writes WORKDIR/bench.json.
- decode table (always): synthetic checkpoints of the Qwen3 0.6B, 1.7B, 4B, 8B and 14B shapes
  (written straight from README's format, random bf16 weights: speed does not depend on the values;
  one at a time, deleted after use), 128 greedy tokens after a prompt of 128 tokens, the persistent
  kernel (-a 1) and the chain (-a 0) in the same run; the 0.6B shape also at contexts 1024, 4096
  and 32768, and with fp16 weights; the 0.6B and 8B shapes also with int8 (Q8_0) weights (format
  version 2: random int8 values and fp16 scales of weights ~N(0, 0.02^2)), with their speed over
  bf16's on the same path and shape.
- the rest (without `decode`): prefill, perplexity mode, load time and memory on WORKDIR/qwen3-0.6b
  (the seeded random Qwen3-0.6B-config model that gpu_parity.py saves; built if absent), and Hugging
  Face transformers on the same weights.
- --against BIN[,BIN...]: only decode of the 0.6B shape (contexts 128, 384, 1024, 4096) and the 8B shape
  (128), ./run against other builds, alternating; with --trace BIN[,BIN...], builds of decode_trace.py's
  copy of decode.cu, each also run for 160 tokens at context 128 of every case's shape, their trace printed;
  with --int8, also the 0.6B shape with int8 weights at context 128 (the persistent kernel, -a 1);
  --cases picks the cases (shape/weights) instead: 0.6B/bf16, 8B/bf16, 0.6B/int8, 8B/int8.
- prefill: only prefill and perplexity mode on synthetic checkpoints (prefill_table), -a 1 against -a 0.

Floor of a decode step: every weight byte the step reads once (all matrices, int8's scales included;
of the embedding one row, unless it is tied to the LM head) plus the K/V bytes of the context, over
the measured device-to-device copy bandwidth. A run that fails is a FAILED row (the others still
run) and makes the exit status 1.
"""
import contextlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_model import HEADER, HEADER_FIELDS, tensor_layout  # noqa: E402  (README's checkpoint layout)

work, text_file, tok_dir = sys.argv[1:4]
# --against BIN[,BIN...]: only decode, ./run against other builds, alternating, in this one run
against = sys.argv[sys.argv.index("--against") + 1].split(",") if "--against" in sys.argv else []
traced = sys.argv[sys.argv.index("--trace") + 1].split(",") if "--trace" in sys.argv else []
# --against's cases (shape/weights), by default 0.6B/bf16 and 8B/bf16 (--int8: and 0.6B/int8), or --cases A,B,...
AB_CASES = {"0.6B/bf16": ("0.6B", 1, (128, 384, 1024, 4096)), "8B/bf16": ("8B", 1, (128,)),
            "0.6B/int8": ("0.6B", 3, (128,)), "8B/int8": ("8B", 3, (128,))}
ab_cases = (sys.argv[sys.argv.index("--cases") + 1].split(",") if "--cases" in sys.argv
            else ["0.6B/bf16", "8B/bf16"] + (["0.6B/int8"] if "--int8" in sys.argv else []))
if not set(ab_cases) <= set(AB_CASES):
    sys.exit(f"error: --cases: each of {', '.join(AB_CASES)}")
decode_only = "decode" in sys.argv[4:]
prefill_only = "prefill" in sys.argv[4:]
torch.set_grad_enabled(False)
rows, failed = [], []
HEAD_DIM, VOCAB = 128, 151936
WNAME = {1: "bf16", 2: "fp16", 3: "int8"}
SHAPES = {  # name: n_layers, dim, hidden_dim, n_heads, n_kv_heads, tied embedding (Qwen3's configs)
    "0.6B": (28, 1024, 3072, 16, 8, True),
    "1.7B": (28, 2048, 6144, 16, 8, True),
    "4B": (36, 2560, 9728, 32, 8, True),
    "8B": (36, 4096, 12288, 32, 8, False),
    "14B": (40, 5120, 17408, 40, 8, False),
}


def synthetic(path, shape, wdtype=1):
    """A checkpoint of a Qwen3 shape (README's layout), matrices random N(0, 0.02^2) in bf16 (1) or fp16
    (2), one 32 MB block of them repeated; or int8 (3, version 2): those values' Q8_0 (int8 values and one
    fp16 scale per 32, ~0.02 x 2.35 / 127), the 16 MB of values and 1 MB of scales repeated; norms and
    k_scale 1. Returns (bytes a decode step reads besides the cache: every tensor's but an untied
    embedding's, K/V bytes per token of context)."""
    L, D, H, nh, nkv, tied = SHAPES[shape]
    h = dict(magic=0x334E5751, version=2 if wdtype == 3 else 1, dim=D, hidden_dim=H, n_layers=L, n_heads=nh,
             n_kv_heads=nkv, head_dim=HEAD_DIM, vocab_size=VOCAB, max_seq_len=40960, rope_theta=1e6, eps=1e-6,
             wdtype=wdtype, flags=(1 if tied else 0) | 2)
    layout, h["file_size"] = tensor_layout(h)
    values = np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32) * 0.02
    scales = None
    if wdtype == 3:  # Q8_0 of the values (round half to even here: the speed does not depend on it)
        blocks = values.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1) / np.float32(127)
        block, scales = np.rint(blocks / d[:, None]).astype(np.int8).ravel(), d.astype(np.float16)
    else:
        block = (values.view(np.uint32) >> 16).astype(np.uint16) if wdtype == 1 else values.astype(np.float16)
    read = 0
    with open(path, "wb") as f:
        f.write(HEADER.pack(*(h[k] for k in HEADER_FIELDS)))
        for name, at, shape_, dtype in layout:
            f.seek(at)
            n = int(np.prod(shape_))
            read += 0 if name.startswith("embedding") and not tied else n * np.dtype(dtype).itemsize
            if np.dtype(dtype) == np.float32:  # norms, k_scale
                f.write(np.ones(n, np.float32).tobytes())
                continue
            src = scales if name.endswith("_scales") else block
            for i in range(0, n, len(src)):
                f.write(src[:min(len(src), n - i)].tobytes())
        f.truncate(h["file_size"])
    return read, L * 2 * nkv * HEAD_DIM * 2


@contextlib.contextmanager
def synthetic_checkpoint(shape, wdtype=1):
    """synthetic()'s checkpoint in WORKDIR for the with block, as (path, bytes read, K/V bytes per token);
    removed after it, also when a run fails (the 8B one is 16 GB)"""
    path = os.path.join(work, f"synthetic-{shape}.bin")
    try:
        yield (path, *synthetic(path, shape, wdtype))
    finally:
        if os.path.exists(path):
            os.remove(path)


def failed_row(label, e):
    """A run that raised: a FAILED row with its last line (the others still run), and the exit status 1"""
    last = str(e).strip().splitlines()[-1][:100] if str(e).strip() else ""
    print(f"{label} failed: {e}", file=sys.stderr)
    rows.append((f"{label}: FAILED", type(e).__name__, last, ""))
    failed.append(label)


def copy_bandwidth():
    n = 1 << 30  # 1 GiB each way, far past the L2
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n / times[len(times) // 2]  # bytes read + written per second


def run(args):
    # every kernel loaded at start, so no timed region pays for lazy module loading
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "CUDA_MODULE_LOADING": "EAGER"})
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)}:\n{r.stderr[-2000:]}")
    return r.stdout, r.stderr


def field(pattern, text):
    m = re.search(pattern, text)
    if not m:
        raise RuntimeError(f"no {pattern!r} in:\n{text[-2000:]}")
    return float(m.group(1))


def decode_tps(binary, checkpoint, prompt, fused=1, context=8192):
    _, err = run([binary, checkpoint, "-i", prompt, "-t", "0", "-n", "128", "-c", str(context), "-a", str(fused)])
    return field(r"\[decode: \d+ tokens, ([\d.]+) tok/s", err), err


def decode_table(bw, prompt_of):
    """Every shape at context 128, both paths; the 0.6B shape at longer contexts, in fp16 and in int8; the 8B
    shape in int8 (each int8 run right after the bf16 one of its shape, and its speed over bf16's)."""
    runs = [("0.6B", 1, (128, 1024, 4096, 32768)), ("0.6B", 2, (128,)), ("0.6B", 3, (128,))]
    for s in list(SHAPES)[1:]:
        runs += [(s, 1, (128,))] + ([(s, 3, (128,))] if s == "8B" else [])
    measured = {}  # (shape, wdtype, context): ({fused: tok/s}, floor)
    for shape, wdtype, contexts in runs:
        try:
            with synthetic_checkpoint(shape, wdtype) as (checkpoint, read, kv_per_token):
                for ctx in contexts:
                    floor = bw / (read + kv_per_token * (ctx + 64))  # tok/s if a step only moved its bytes
                    tps = {fused: decode_tps("./run", checkpoint, prompt_of(ctx), fused, ctx + 256)[0]
                           for fused in (1, 0)}
                    measured[shape, wdtype, ctx] = tps, floor
                    for fused in (1, 0):
                        rows.append((f"{shape} {WNAME[wdtype]}, context {ctx}, "
                                     + ("persistent kernel" if fused else "chain of kernels"),
                                     f"{tps[fused]:.0f}", f"floor {floor:.0f}", f"{tps[fused] / floor:.0%}"))
                    rows.append((f"  persistent / chain", f"{tps[1] / tps[0]:.2f}x", "", ""))
                    if wdtype == 3 and (shape, 1, ctx) in measured:
                        base, base_floor = measured[shape, 1, ctx]
                        rows.append((f"  int8 / bf16 ({shape}, context {ctx}, same path)",
                                     f"persistent {tps[1] / base[1]:.2f}x", f"chain {tps[0] / base[0]:.2f}x",
                                     f"floors {floor / base_floor:.2f}x"))
        except Exception as e:  # noqa: BLE001 (a failed run is a row; the others still run)
            failed_row(f"{shape} {WNAME[wdtype]}", e)


def matmul_peak():
    """bf16 TFLOP/s of cuBLAS on 8192^3 (median of 10 timed products after warm-up): the tensor cores' reach"""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192 ** 3 / sorted(times)[5] / 1e12


def prefill_flops(shape, n):
    """FLOPs per token of an n-token prefill: the layers' products, causal attention over (n + 1) / 2 keys on
    average, the LM head of the last token"""
    L, D, H, nh, nkv, _ = SHAPES[shape]
    qkv = (nh + 2 * nkv) * HEAD_DIM
    products = 2 * L * (D * qkv + nh * HEAD_DIM * D + D * 2 * H + H * D)
    return products + L * 4 * nh * HEAD_DIM * (n + 1) / 2 + 2 * D * VOCAB / n


def prefill_table(prompt_of):
    """prefill tok/s of the 0.6B shape (2k, 8k, 32k-token prompts) and the 8B shape (2k), and perplexity
    mode on the 0.6B shape (32k tokens, windows of 2048), each with -a 1 (TMA products) and -a 0 (the
    simple products) in the same run (and --against's builds); TFLOP/s against cuBLAS's 8192^3 in this run"""
    peak = matmul_peak()
    rows.append(("cuBLAS bf16 8192^3 (the peak below)", f"{peak:.0f} TFLOP/s", "", ""))
    variants = [("./run", 1, "TMA products (-a 1)"), ("./run", 0, "simple products (-a 0)")]
    variants += [(build, 1, f"{build} -a 1") for build in against]  # other builds, their default path
    for shape, lengths in (("0.6B", (2048, 8192, 32768)), ("8B", (2048,))):
        try:
            with synthetic_checkpoint(shape) as (checkpoint, _, _):
                for n in lengths:
                    for binary, fused, name in variants:
                        _, err = run([binary, checkpoint, "-i", prompt_of(n), "-t", "0", "-n", "1", "-c",
                                      str(n + 256), "-a", str(fused)])
                        tps = field(r"\[prefill: \d+ tokens, ([\d.]+) tok/s", err)
                        tflops = tps * prefill_flops(shape, field(r"\[prefill: (\d+) tokens", err)) / 1e12
                        rows.append((f"{shape} prefill, {n}-token prompt, {name}", f"{tps:.0f} tok/s",
                                     f"{tflops:.0f} TFLOP/s", f"{tflops / peak:.0%} of peak"))
                if shape == "0.6B":
                    ppl_text = os.path.join(work, "ppl.txt")
                    open(ppl_text, "w", encoding="utf-8").write(prompt_of(32768))
                    for binary, fused, name in variants:
                        _, err = run([binary, checkpoint, "-m", "ppl", "-f", ppl_text, "-c", "2048", "-a", str(fused)])
                        ppl_tps = float(re.findall(r"([\d.]+) tok/s\]", err)[-1])
                        rows.append((f"{shape} perplexity mode (32k tokens, windows of 2048), {name}",
                                     f"{ppl_tps:.0f} tok/s", "", ""))
        except Exception as e:  # noqa: BLE001 (a failed run is a row; the others still run)
            failed_row(f"{shape} prefill", e)


def main():
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = open(text_file, encoding="utf-8").read()
    ids = tok.encode(text[:400000])
    prompt_of = lambda n: tok.decode(ids[:n])  # noqa: E731 (about n tokens of Shakespeare)
    rows.append(("device-to-device copy", f"{bw / 1e12:.2f} TB/s", "", ""))

    if against and not prefill_only:  # A/B: three alternating runs each, medians
        for shape, wdtype, contexts in (AB_CASES[case] for case in ab_cases):
            with synthetic_checkpoint(shape, wdtype) as (checkpoint, read, kv_per_token):
                for ctx in contexts:
                    floor = bw / (read + kv_per_token * (ctx + 64))
                    times = {b: [] for b in ["./run"] + against}
                    for _ in range(3):
                        for b in times:
                            times[b].append(decode_tps(b, checkpoint, prompt_of(ctx))[0])
                    for b, t in times.items():
                        tps = sorted(t)[1]
                        rows.append((f"{shape} {WNAME[wdtype]} decode tok/s at context {ctx}, {b}", f"{tps:.0f} ({', '.join(f'{x:.0f}' for x in t)})",
                                     f"floor {floor:.0f}", f"{tps / floor:.0%}"))
                        print(" | ".join(rows[-1]), flush=True)  # as it comes, should a time limit stop the run
                for b in traced:
                    out, _ = run([b, checkpoint, "-i", prompt_of(128), "-t", "0", "-n", "160", "-c", "8192", "-a", "1"])
                    print("\n".join(f"{b} ({shape} {WNAME[wdtype]}): {line}" for line in out.splitlines() if line.startswith("trace")))
        return print_table(gpu)

    if prefill_only:
        prefill_table(prompt_of)
        return print_table(gpu)
    decode_table(bw, prompt_of)
    if decode_only:
        return print_table(gpu)

    path = os.path.join(work, "qwen3-0.6b")
    checkpoint = os.path.join(work, "qwen3-0.6b.bf16.bin")
    if not os.path.exists(checkpoint):
        if not os.path.exists(path):
            from gpu_parity import build  # noqa: E402  (builds and saves the same seeded model)
            build("qwen3-0.6b", 10, path)
        run([sys.executable, "export.py", path, checkpoint, "--dtype", "bf16"])
    tps, err = decode_tps("./run", checkpoint, prompt_of(128))
    rows.append(("decode tok/s at context 128 (qwen3-0.6b, trained-shape random model)", f"{tps:.0f}", "", ""))
    load = field(r"in ([\d.]+) s:", err)
    mem = field(r"GPU memory in use: (\d+) MB", err)
    for n in (512, 2048):
        _, err = run(["./run", checkpoint, "-i", tok.decode(ids[:n]), "-t", "0", "-n", "1", "-c", "4096"])
        prefill = field(r"\[prefill: \d+ tokens, ([\d.]+) tok/s", err)
        ttft = field(r"tok/s, ([\d.]+) ms\]", err)
        rows.append((f"prefill tok/s, {n}-token prompt", f"{prefill:.0f}", "", ""))
        rows.append((f"time to first token, {n}-token prompt", f"{ttft:.1f} ms", "", ""))
    ppl_text = os.path.join(work, "ppl.txt")
    open(ppl_text, "w", encoding="utf-8").write(tok.decode(ids[:32768]))
    _, err = run(["./run", checkpoint, "-m", "ppl", "-f", ppl_text, "-c", "2048"])
    ppl_tps = float(re.findall(r"([\d.]+) tok/s\]", err)[-1])
    rows.append(("perplexity mode tok/s (32k tokens, ctx 2048)", f"{ppl_tps:.0f}", "", ""))
    rows.append(("checkpoint load (warm page cache)", f"{load:.2f} s", "target 0.5 s", ""))
    rows.append(("GPU memory in use (context 8192)", f"{mem:.0f} MB", "", ""))

    # Hugging Face transformers on the same weights, bf16, sdpa
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    prompt = torch.tensor([ids[:128]]).cuda()

    def timed(fn, reps=5):  # median seconds after a warm-up
        fn()
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times)[reps // 2]

    gen = lambda n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)  # noqa: E731
    hf_decode = 128 / (timed(lambda: gen(129), 3) - timed(lambda: gen(1), 3))
    hf_prefill = 2048 / timed(lambda: model(torch.tensor([ids[:2048]]).cuda()))
    rows.append(("HF generate decode tok/s at context 128 (bf16, sdpa)", f"{hf_decode:.0f}", "", ""))
    rows.append(("HF prefill tok/s, 2048 tokens (bf16, sdpa)", f"{hf_prefill:.0f}", "", ""))
    ours_prefill = float(next(r[1] for r in rows if r[0].startswith("prefill tok/s, 2048")))
    rows.append(("ours / HF: decode", f"{tps / hf_decode:.1f}x", "", ""))
    rows.append(("ours / HF: prefill 2048", f"{ours_prefill / hf_prefill:.2f}x", "target 2.5x", ""))

    print_table(gpu)


def print_table(gpu):
    print(f"\n{gpu}, {time.strftime('%Y-%m-%d')}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    json.dump({"gpu": gpu, "rows": rows}, open(os.path.join(work, "bench.json"), "w"))


main()
sys.exit(1 if failed else 0)
