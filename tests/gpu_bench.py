"""Speed of ./run against the memory-bandwidth floor and against Hugging Face, in one run.

Runs on the GPU machine from the repo root after `make run`:
    python3 tests/gpu_bench.py WORKDIR TEXT_FILE TOKENIZER_DIR [--against OTHER_BUILD]
Uses WORKDIR/qwen3-0.6b (the seeded random Qwen3-0.6B-config model that gpu_parity.py saves)
and its bf16 export, building them if absent. Prints one table last; writes WORKDIR/bench.json.

Floor of a decode step: every weight byte read once (the tied embedding counts once, as the LM
head) plus the K/V bytes of the context, over the measured device-to-device copy bandwidth.
"""
import json
import os
import re
import subprocess
import sys
import time

import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

work, text_file, tok_dir = sys.argv[1:4]
# --against BIN: only decode, ./run against another build (BIN), alternating, in this one run
against = sys.argv[sys.argv.index("--against") + 1] if "--against" in sys.argv else None
torch.set_grad_enabled(False)
rows = []


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


def main():
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    path = os.path.join(work, "qwen3-0.6b")
    checkpoint = os.path.join(work, "qwen3-0.6b.bf16.bin")
    if not os.path.exists(checkpoint):
        if not os.path.exists(path):
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from gpu_parity import build  # noqa: E402  (builds and saves the same seeded model)
            build("qwen3-0.6b", 10, path)
        run([sys.executable, "export.py", path, checkpoint, "--dtype", "bf16"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = open(text_file, encoding="utf-8").read()
    ids = tok.encode(text[:400000])
    weight_bytes = os.path.getsize(checkpoint) - 256
    kv_per_token = 28 * 2 * 8 * 128 * 2
    rows.append(("device-to-device copy", f"{bw / 1e12:.2f} TB/s", "", ""))

    def floor(ctx):  # tok/s if a step only moved the weights and the K/V of its context
        return bw / (weight_bytes + kv_per_token * (ctx + 64))

    def decode_tps(binary, ctx, fused=0):
        _, err = run([binary, checkpoint, "-i", tok.decode(ids[:ctx]), "-t", "0", "-n", "128", "-c", "8192",
                      "-a", str(fused)])
        return field(r"\[decode: \d+ tokens, ([\d.]+) tok/s", err), err

    if against:  # A/B: three alternating runs each, medians
        for ctx in (128, 1024, 4096):
            times = {b: [] for b in ("./run", against)}
            for _ in range(3):
                for b in times:
                    times[b].append(decode_tps(b, ctx)[0])
            for b, t in times.items():
                tps = sorted(t)[1]
                rows.append((f"decode tok/s at context {ctx}, {b}", f"{tps:.0f} ({', '.join(f'{x:.0f}' for x in t)})",
                             f"floor {floor(ctx):.0f}", f"{tps / floor(ctx):.0%}"))
        return print_table(gpu)

    # decode at several contexts: a prompt of that many tokens, then 128 greedy tokens; one kernel
    # per attention step (-a 0, the default) and the fused attention kernel (-a 1)
    for ctx, fused in ((128, 0), (1024, 0), (4096, 0), (128, 1), (4096, 1)):
        tps, err = decode_tps("./run", ctx, fused)
        label = f"decode tok/s at context {ctx}" + (", fused attention kernel" if fused else "")
        rows.append((label, f"{tps:.0f}", f"floor {floor(ctx):.0f}", f"{tps / floor(ctx):.0%}"))
        if ctx == 128 and not fused:
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

    gen = lambda n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    hf_decode = 128 / (timed(lambda: gen(129), 3) - timed(lambda: gen(1), 3))
    hf_prefill = 2048 / timed(lambda: model(torch.tensor([ids[:2048]]).cuda()))
    rows.append(("HF generate decode tok/s at context 128 (bf16, sdpa)", f"{hf_decode:.0f}", "", ""))
    rows.append(("HF prefill tok/s, 2048 tokens (bf16, sdpa)", f"{hf_prefill:.0f}", "", ""))
    ours_decode = float(rows[1][1])
    ours_prefill = float(next(r[1] for r in rows if r[0].startswith("prefill tok/s, 2048")))
    rows.append(("ours / HF: decode", f"{ours_decode / hf_decode:.1f}x", "", ""))
    rows.append(("ours / HF: prefill 2048", f"{ours_prefill / hf_prefill:.2f}x", "target 2.5x", ""))

    print_table(gpu)


def print_table(gpu):
    print(f"\n{gpu}, {time.strftime('%Y-%m-%d')}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    json.dump({"gpu": gpu, "rows": rows}, open(os.path.join(work, "bench.json"), "w"))


main()
