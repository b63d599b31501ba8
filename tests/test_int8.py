"""int8 (Q8_0) weights: export.py's quantizer against the spec written out here block by block,
runcpu's int8 path against its float32 path on the dequantized weights, the trained demo's perplexity,
bad int8 checkpoints and exports.

Tolerances: float(q) * scale is exact in float32 (8 x 11 significant bits) and runcpu sums int8
rows in the same order as float32 ones, so int8 logits equal those of the dequantized float32 file:
we require relative L2 <= 1e-5 per position (issue 10's bound) and equal greedy tokens. Quantizing
the demo model costs it perplexity: within 1% of the bf16 export's, on the same windows."""
import json
import math
import os
import shutil
import struct
import sys

import numpy as np

from harness import FIXTURES, ROOT, RUNCPU, TMP, assert_one_error_line, export, logits_of, reference, run, write_ids
from test_demo import DEMO_TOKENIZER, REF, UNDER_ASAN, validation_text
from test_model import HEADER, HEADER_FIELDS, SMALL, blank_checkpoint, checkpoint, source_tensors, tensor_layout

EXPORT = os.path.join(ROOT, "export.py")
MATRICES = ["embedding", "wqkv", "wo", "w_gate_up", "w_down", "lm_head"]
# SMALL's Qwen2 fixture (dim 112) and qwen3_fullvocab_bf16 (dim 16) have widths int8 refuses; a
# synthetic Qwen2 (tiny_model below) stands in for the bias path
INT8_FIXTURES = [name for name in SMALL if name != "qwen2_gqa7_bias_fp32"]
# the validation split's first 8 windows of 512 (the whole split: ~80 s a model), 2 under ASan (~5x slower)
DEMO_PPL_TOKENS = 1024 if UNDER_ASAN else 4096


# ----------------------------------------------------------------------------------------------
# the spec, one block and one weight at a time

def q8_0_reference(row):
    """ggml's quantize_row_q8_0_ref for one float32 row: (q list, fp16 scale bits list). float32
    scalars; roundf as floor(|v| + 0.5) in double (exact: v has 24 significant bits and |v| <= 127);
    fp16 by CPython's struct 'e' (nearest even), not numpy. A block whose 1/d overflows float32
    (max |x| < 3.7e-37) gets 1/d = 0, as d = 0 does: export.py's reading of the spec."""
    qs, scales = [], []
    for start in range(0, len(row), 32):
        block = [np.float32(x) for x in row[start:start + 32]]
        amax = np.float32(0)
        for x in block:
            amax = max(amax, abs(x))
        d = amax / np.float32(127)
        with np.errstate(over="ignore"):
            inv = np.float32(1) / d if d != 0 else np.float32(0)
        if math.isinf(inv):
            inv = np.float32(0)
        for x in block:
            v = float(x * inv)
            qs.append(int(math.copysign(math.floor(abs(v) + 0.5), v)))
        scales.append(struct.unpack("<H", struct.pack("<e", float(d)))[0])
    return qs, scales


def source_matrices(folder, h):
    """The weight matrices of a Hugging Face folder as float32, stacked as in the checkpoint."""
    src = source_tensors(folder)
    per_layer = lambda *keys: np.stack([np.concatenate([src[f"model.layers.{l}.{k}"] for k in keys])
                                        for l in range(h["n_layers"])])
    out = {"embedding": src["model.embed_tokens.weight"],
           "wqkv": per_layer(*(f"self_attn.{p}_proj.weight" for p in "qkv")),
           "wo": per_layer("self_attn.o_proj.weight"),
           "w_gate_up": per_layer("mlp.gate_proj.weight", "mlp.up_proj.weight"),
           "w_down": per_layer("mlp.down_proj.weight")}
    if not h["flags"] & 1:
        out["lm_head"] = src["lm_head.weight"]
    return out


# ----------------------------------------------------------------------------------------------
# hand-written model folders

def write_safetensors(path, tensors):
    """A safetensors file of float32 tensors, written by hand."""
    meta, at = {}, 0
    for key, x in tensors.items():
        meta[key] = {"dtype": "F32", "shape": list(x.shape), "data_offsets": [at, at + x.nbytes]}
        at += x.nbytes
    head = json.dumps(meta).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x, np.float32).tobytes())


def tiny_model(name, dim=64, hidden=64, n_heads=2, n_kv_heads=1, head_dim=32, vocab=64, layers=1,
               qwen2=False, tied=True, embedding=None, seed=0):
    """A seeded random float32 Qwen3 (or Qwen2, with q/k/v biases) folder in tests/tmp."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    gain = lambda n: (rng.random(n) + 0.5).astype(np.float32)
    t = {"model.embed_tokens.weight": rand(vocab, dim) * 8 if embedding is None else embedding,
         "model.norm.weight": gain(dim)}
    if not tied:
        t["lm_head.weight"] = rand(vocab, dim)
    for l in range(layers):
        p = f"model.layers.{l}."
        t.update({p + "input_layernorm.weight": gain(dim), p + "post_attention_layernorm.weight": gain(dim),
                  p + "self_attn.q_proj.weight": rand(n_heads * head_dim, dim),
                  p + "self_attn.k_proj.weight": rand(n_kv_heads * head_dim, dim),
                  p + "self_attn.v_proj.weight": rand(n_kv_heads * head_dim, dim),
                  p + "self_attn.o_proj.weight": rand(dim, n_heads * head_dim),
                  p + "mlp.gate_proj.weight": rand(hidden, dim), p + "mlp.up_proj.weight": rand(hidden, dim),
                  p + "mlp.down_proj.weight": rand(dim, hidden)})
        if qwen2:
            for x, n in (("q", n_heads), ("k", n_kv_heads), ("v", n_kv_heads)):
                t[p + f"self_attn.{x}_proj.bias"] = rand(n * head_dim) * 8
        else:
            t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"] = gain(head_dim), gain(head_dim)
    folder = os.path.join(TMP, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    config = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "Qwen3ForCausalLM"], "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv_heads, "head_dim": head_dim, "vocab_size": vocab,
              "max_position_embeddings": 256, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": tied, "dtype": "float32"}
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    write_safetensors(os.path.join(folder, "model.safetensors"), t)
    return folder


def crafted_embedding():
    """(64, 64) embedding rows: the quantizer's edge cases, a block (32 values) each, then random
    blocks. Each crafted block holds its max |x| once, the rest below it."""
    rng = np.random.default_rng(1)
    rest = lambda amax, n=31: (rng.uniform(-0.99, 0.99, n) * amax).astype(np.float32)
    f32 = np.float32
    halves = [2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5, np.nextafter(f32(0.5), f32(0)), -0.25]
    blocks = [
        np.zeros(32, np.float32),                                  # all zeros: d = 0, 1/d taken as 0
        [127] + halves + list(rest(127, 21)),                      # d = 1: x * (1/d) = x, exact halves
        [-100] + list(rest(100)),                                  # the max |x| is negative
        [127 * (1 + 2.0 ** -11)] + list(rest(127)),                # d = 1 + 2^-11: an fp16 tie (to 1)
        [127 * (1 + 3 * 2.0 ** -11)] + list(rest(127)),            # another fp16 tie, rounding up
        [1e-5] + list(rest(1e-5)),                                 # fp16-subnormal scale
        [-127 * 2.0 ** -25] + list(rest(127 * 2.0 ** -25)),        # d = 2^-25: a tie between 0 and 2^-24
        [127 * 1.5 * 2.0 ** -25] + list(rest(127 * 2.0 ** -25)),   # d = 1.5 * 2^-25: rounds to 2^-24
        [1e-36] + list(rest(1e-36)),                               # float32-subnormal d, 1/d finite
        [1e-39] + list(rest(1e-39)),                               # 1/d overflows float32
        [65504 * 127] + list(rest(65504 * 127)),                   # the largest scale fp16 holds
    ]
    crafted = np.array(blocks, np.float32).reshape(-1)
    emb = (rng.standard_normal((64, 64)) * 3).astype(np.float32)
    emb.reshape(-1)[:crafted.size] = crafted
    return emb


# ----------------------------------------------------------------------------------------------
# the quantizer

def test_quantizer_matches_the_spec():
    """Every int8 value and fp16 scale of the exported files equal to the per-block reference, for a
    bf16 and an fp32 (untied, sharded) fixture and a model whose embedding holds crafted edge cases;
    the float32 tensors and the header equal those of the fp32 export."""
    folders = [os.path.join(FIXTURES, name) for name in ("qwen3_gqa2_bf16", "qwen3_mha_untied_fp32_sharded")]
    folders.append(tiny_model("int8_crafted", embedding=crafted_embedding()))
    weights = blocks = 0
    for folder in folders:
        h, t, _ = checkpoint(export(folder, "int8"))
        h32, t32, _ = checkpoint(export(folder, "fp32"))
        assert h["version"] == 2 and h["wdtype"] == 3, h
        assert {k: v for k, v in h.items() if k not in ("version", "wdtype", "file_size")} == \
            {k: v for k, v in h32.items() if k not in ("version", "wdtype", "file_size")}
        matrices = source_matrices(folder, h)
        assert set(t) == set(t32) | {m + "_scales" for m in matrices}, sorted(t)
        for name in t32:
            if name not in matrices:
                assert np.array_equal(t[name], t32[name]), f"{folder}: {name} differs from the fp32 export"
        for name, src in matrices.items():
            src = np.asarray(src, np.float32).reshape(-1, src.shape[-1])
            q, scales = t[name].reshape(src.shape), t[name + "_scales"].reshape(len(src), -1).view(np.uint16)
            for r, row in enumerate(src):
                want_q, want_scales = q8_0_reference(row)
                bad = [i for i, (a, b) in enumerate(zip(q[r].tolist(), want_q)) if a != b]
                assert not bad, f"{folder}: {name} row {r}, column {bad[0]}: {row[bad[0]]!r} gives " \
                    f"{q[r, bad[0]]}, the spec {want_q[bad[0]]}"
                assert scales[r].tolist() == want_scales, \
                    f"{folder}: {name} row {r}: scale bits {scales[r].tolist()}, the spec {want_scales}"
            weights, blocks = weights + src.size, blocks + scales.size
    print(f"     {weights} int8 values and {blocks} fp16 scales equal to the per-block reference")


def test_quantizer_streams_in_chunks():
    """An embedding of 140,000 rows of 64, more than the 131,072 rows (32 MB of float32) that export.py
    quantizes at a time: rows on both sides of the chunk boundary, every 500th and the last equal
    to the per-block reference (the second chunk's values and scales land where they belong)."""
    vocab = 140000
    folder = tiny_model("int8_two_chunks", vocab=vocab)
    h, t, _ = checkpoint(export(folder, "int8"))
    src = source_matrices(folder, h)["embedding"]
    rows = sorted(set(range(0, vocab, 500)) | set(range(131072 - 3, 131072 + 3)) | {vocab - 1})
    for r in rows:
        assert (t["embedding"][r].tolist(), t["embedding_scales"][r].view(np.uint16).tolist()) == \
            q8_0_reference(src[r]), f"embedding row {r} differs from the spec"
    print(f"     {len(rows)} of {vocab} embedding rows checked, across the chunk boundary")


# ----------------------------------------------------------------------------------------------
# runcpu's int8 path

def dequantized(path):
    """An int8 checkpoint rewritten as a version-1 float32 one: each matrix float32(q) * float32(scale)."""
    h, t, _ = checkpoint(path)
    h = dict(h, version=1, wdtype=0)
    layout, h["file_size"] = tensor_layout(h)
    blob = np.zeros(h["file_size"], np.uint8)
    blob[:HEADER.size] = np.frombuffer(HEADER.pack(*(h[f] for f in HEADER_FIELDS)), np.uint8)
    for name, at, shape, _ in layout:
        x = t[name].astype(np.float32)
        if name in MATRICES:
            x = x * np.repeat(t[name + "_scales"].astype(np.float32), 32, axis=-1)
        blob[at:at + x.nbytes] = x.reshape(-1).view(np.uint8)
    out = path.replace(".bin", ".dequantized.bin")
    blob.tofile(out)
    return out


def test_int8_matches_dequantized_float32():
    """Logits at every position and 32 greedy tokens of each int8 export against runcpu's float32 path
    on the same weights dequantized by numpy."""
    cases = [(name, reference(name)["ids"], reference(name)["greedy_prompt"]) for name in INT8_FIXTURES]
    ids = np.random.default_rng(2).integers(0, 64, 40).tolist()
    cases.append((tiny_model("int8_qwen2_bias", dim=96, hidden=160, n_heads=3, n_kv_heads=1, layers=2,
                             qwen2=True, seed=3), ids, ids[:6]))
    for name, ids, prompt in cases:
        model = export(name, "int8")
        as_fp32 = dequantized(model)
        ours, _ = logits_of(model, ids)
        ref, _ = logits_of(as_fp32, ids)
        rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert rel.max() <= 1e-5, f"{name}: position {rel.argmax()} relative L2 {rel.max():.2e} > 1e-5"
        _, greedy = logits_of(model, prompt, greedy=32)
        _, greedy_ref = logits_of(as_fp32, prompt, greedy=32)
        assert greedy == greedy_ref, f"{name}: greedy\n int8 {greedy}\n fp32 {greedy_ref}"
        print(f"     {os.path.basename(name)}: worst relative L2 {rel.max():.1e} over {len(ids)} positions "
              f"({'bit-identical' if np.array_equal(ours, ref) else 'not bit-identical'}), 32 greedy tokens equal")


def ppl(model, tokens):
    rc, out, err = run([RUNCPU, model, "-m", "ppl", "-f", validation_text(), "-c", str(REF["context"]),
                        "-z", DEMO_TOKENIZER, "-n", str(tokens)], timeout=600)
    assert rc == 0, err
    fields = out.split()
    return float(fields[1]), int(fields[5])


def test_demo_int8_perplexity():
    """The trained demo model: int8's perplexity within 1% of its bf16 export's, on the validation
    split's first DEMO_PPL_TOKENS tokens, in the same windows of 512."""
    demo = os.path.join(ROOT, "demo")
    (bf16, scored), (int8, scored8) = ppl(export(demo), DEMO_PPL_TOKENS), ppl(export(demo, "int8"), DEMO_PPL_TOKENS)
    assert scored == scored8
    rel = (int8 - bf16) / bf16
    print(f"     perplexity int8 {int8:.4f}, bf16 {bf16:.4f} ({rel:+.2e} relative) over {scored} tokens")
    assert abs(rel) <= 0.01, f"int8 perplexity {int8} vs bf16 {bf16}"


# ----------------------------------------------------------------------------------------------
# bad files

def test_bad_int8_checkpoints():
    """Bad versions, truncation, sizes and widths of int8 files: one error line and exit 1 each."""
    good = open(export("qwen3_gqa2_bf16", "int8"), "rb").read()
    bf16 = open(export("qwen3_gqa2_bf16"), "rb").read()
    with_u32 = lambda data, offset, value: data[:offset] + struct.pack("<I", value) + data[offset + 4:]
    cases = {
        "version 1": with_u32(good, 4, 1), "version 3": with_u32(good, 4, 3),
        "truncated by 1": good[:-1], "truncated to half": good[:len(good) // 2],
        "bf16 tensors under an int8 header": with_u32(with_u32(bf16, 4, 2), 48, 3),
    }
    ids = write_ids([1, 2, 3])
    path = os.path.join(TMP, "bad_int8.bin")
    for case, data in cases.items():
        open(path, "wb").write(data)
        rc, _, err = run([RUNCPU, path, "-m", "logits", "-f", ids])
        assert_one_error_line(rc, err, case)
        assert rc == 1 and ("version" in err or not case.startswith("version")), f"{case}: exit {rc}, {err}"
    # widths that are not whole blocks, in headers whose sizes follow README's layout (rows x cols // 32
    # scales), are refused; the same blank file with every width a multiple of 32 loads
    path = os.path.join(TMP, "blank_int8.bin")
    rc, _, err = run([RUNCPU, blank_checkpoint(path, version=2, wdtype=3), "-m", "logits", "-f", ids])
    assert rc == 0, err
    widths = [{"dim": 48}, {"hidden_dim": 80}, {"n_heads": 3, "head_dim": 16}]
    for fields in widths:
        rc, _, err = run([RUNCPU, blank_checkpoint(path, version=2, wdtype=3, **fields), "-m", "logits", "-f", ids])
        assert_one_error_line(rc, err, f"int8 with {fields}")
        assert rc == 1 and "multiple" in err, f"int8 with {fields}: exit {rc}, {err}"
    print(f"     {len(cases) + len(widths)} bad int8 checkpoints rejected with one error line each")


def test_int8_export_rejections():
    """A weight whose scale overflows fp16, and widths that are not multiples of 32: one error line,
    exit 1, no file (nor .tmp) left."""
    def export_error(folder, what, says):
        out = os.path.join(TMP, "rejected_int8.bin")
        rc, _, err = run([sys.executable, EXPORT, folder, out, "--dtype", "int8"])
        assert_one_error_line(rc, err, what)
        assert rc == 1 and says in err, f"{what}: exit {rc}, {err!r}"
        assert not os.path.exists(out) and not os.path.exists(out + ".tmp"), f"{what}: left a partial file"

    for value in (1e7, np.nextafter(np.float32(65504 * 127), np.float32(np.inf))):  # just past the crafted maximum
        emb = np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32)
        emb[37, 5] = value
        export_error(tiny_model("int8_overflow", embedding=emb), f"weight {value}", "range")
    export_error(tiny_model("int8_dim48", dim=48), "dim 48", "multiples of 32")
    export_error(tiny_model("int8_hidden80", hidden=80), "hidden_dim 80", "multiples of 32")
    export_error(tiny_model("int8_q48", n_heads=3, head_dim=16), "n_heads * head_dim 48", "multiples of 32")
    for name in ("qwen2_gqa7_bias_fp32", "qwen3_fullvocab_bf16"):
        export_error(os.path.join(FIXTURES, name), name, "multiples of 32")
