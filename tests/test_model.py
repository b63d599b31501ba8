"""export.py and the CPU reference forward pass against Hugging Face transformers (float32).

Tolerances: HF's reference is float32 PyTorch; ours is float32 with double-precision sums, so the
two differ by float32 rounding in different summation orders: relative L2 error per position of a
few 1e-6 on these sizes (measured worst 1.1e-5). We require <= 1e-4. Top-1 must agree wherever
HF's top-1/top-2 gap exceeds 1e-3 (rounding moves logits by ~1e-4 at most here); greedy
continuations must agree token for token up to the first step where HF's gap is under 1e-3."""
import json
import os
import shutil
import struct
import sys

import numpy as np

from harness import FIXTURES, ROOT, RUNCPU, TMP, assert_one_error_line, export, logits_of, reference, run, write_ids

sys.path.insert(0, ROOT)
from export import bf16_to_f32, f32_to_bf16  # noqa: E402

SMALL = ["qwen3_gqa2_bf16", "qwen3_mha_untied_fp32_sharded", "qwen3_gqa4_bf16", "qwen2_gqa7_bias_fp32"]
REL_TOL, TIE_GAP = 1e-4, 1e-3


def compare_logits(name, ours):
    ref = np.load(os.path.join(FIXTURES, name, "ref_logits.npy"))
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > TIE_GAP
    disagree = np.flatnonzero(clear & (ours.argmax(1) != ref.argmax(1)))
    assert rel.max() <= REL_TOL, f"{name}: position {rel.argmax()} relative L2 error {rel.max():.2e} > {REL_TOL}"
    assert len(disagree) == 0, f"{name}: top-1 differs from HF at positions {disagree.tolist()}"
    return rel.max()


def test_logits_match_hf():
    for name in SMALL:
        ours, _ = logits_of(export(name), reference(name)["ids"])
        worst = compare_logits(name, ours)
        print(f"     {name}: worst relative L2 {worst:.2e} over {len(ours)} positions")


def test_greedy_matches_hf():
    for name in SMALL + ["qwen3_fullvocab_bf16"]:
        ref = reference(name)
        rc, out, err = run([RUNCPU, export(name), "-m", "logits", "-f", write_ids(ref["greedy_prompt"]), "-n", "64"])
        assert rc == 0, err
        ours = [int(t) for t in out.split()]
        gaps = ref["greedy_margins"]
        checked = next((i for i, g in enumerate(gaps) if g < TIE_GAP), len(gaps)) + 1
        checked = min(checked, len(gaps))
        assert ours[:checked] == ref["greedy"][:checked], \
            f"{name}: greedy differs from HF\n ours {ours[:checked]}\n hf   {ref['greedy'][:checked]}"
        print(f"     {name}: {checked}/64 greedy tokens equal to HF's (smallest HF gap {min(gaps):.4f})")


HEADER = struct.Struct("<II8iffIIQ")
HEADER_FIELDS = ["magic", "version", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "vocab_size", "max_seq_len", "rope_theta", "eps", "wdtype", "flags", "file_size"]
WEIGHT_DTYPES = {0: np.float32, 1: np.uint16, 2: np.float16, 3: np.int8}  # bf16 as its raw bits


def tensor_layout(h):
    """(name, byte offset, shape, dtype) of every tensor of a checkpoint with header fields h, in the
    order and alignment of README.md's table; and the file size."""
    L, D, H, hd, V = h["n_layers"], h["dim"], h["hidden_dim"], h["head_dim"], h["vocab_size"]
    q, kv = h["n_heads"] * hd, h["n_kv_heads"] * hd
    w, f32 = WEIGHT_DTYPES[h["wdtype"]], np.float32
    order = [("embedding", (V, D), w), ("rms_att", (L, D), f32), ("rms_ffn", (L, D), f32)]
    if h["flags"] & 2:
        order += [("q_norm", (L, hd), f32), ("k_norm", (L, hd), f32)]
    order.append(("k_scale", (L,), f32))
    if h["flags"] & 4:
        order.append(("bqkv", (L, q + 2 * kv), f32))
    order += [("wqkv", (L, q + 2 * kv, D), w), ("wo", (L, D, q), w), ("w_gate_up", (L, 2 * H, D), w),
              ("w_down", (L, D, H), w), ("rms_final", (D,), f32)]
    if not h["flags"] & 1:
        order.append(("lm_head", (V, D), w))
    if h["wdtype"] == 3:  # int8: each matrix followed by its fp16 scales, one per 32 weights of a row
        order = [t for name, shape, dtype in order for t in [(name, shape, dtype)] +
                 ([(name + "_scales", shape[:-1] + (shape[-1] // 32,), np.float16)] if dtype == w else [])]
    tensors, at = [], 256
    for name, shape, dtype in order:
        at = (at + 255) // 256 * 256
        tensors.append((name, at, shape, dtype))
        at += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return tensors, (at + 255) // 256 * 256


def checkpoint(path):
    """An exported checkpoint read by the layout in README.md: (header fields, {tensor: array}, blob).
    The arrays are views of blob (writable: change them, then blob.tofile(...))."""
    blob = np.fromfile(path, np.uint8)
    h = dict(zip(HEADER_FIELDS, HEADER.unpack_from(blob.tobytes()[:HEADER.size])))
    layout, size = tensor_layout(h)
    assert size == len(blob) == h["file_size"], f"{path}: layout ends at {size}, file {len(blob)}"
    tensors = {name: blob[at:at + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
               for name, at, shape, dtype in layout}
    return h, tensors, blob


def blank_checkpoint(path, **fields):
    """A float32 checkpoint of any shape (fields override a tiny Qwen3's header): zero matrices, unit
    norms, k_scale 1. For shape checks: its outputs are all zero."""
    h = dict(magic=0x334E5751, version=1, dim=64, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
             head_dim=32, vocab_size=64, max_seq_len=64, rope_theta=1e6, eps=1e-6, wdtype=0, flags=1 | 2)
    h.update(fields)
    layout, h["file_size"] = tensor_layout(h)
    blob = np.zeros(h["file_size"], np.uint8)
    blob[:HEADER.size] = np.frombuffer(HEADER.pack(*(h[f] for f in HEADER_FIELDS)), np.uint8)
    for name, at, shape, dtype in layout:
        if name in ("rms_att", "rms_ffn", "q_norm", "k_norm", "k_scale", "rms_final"):
            blob[at:at + int(np.prod(shape)) * 4].view(np.float32)[:] = 1.0
    blob.tofile(path)
    return path


def source_tensors(folder):
    """Every tensor of a Hugging Face folder as float32 (bf16 widened exactly), read from the safetensors
    files here, not through export.py."""
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for name in files:
        blob = open(os.path.join(folder, name), "rb").read()
        (n,) = struct.unpack_from("<Q", blob)
        for key, info in json.loads(blob[8:8 + n]).items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = {"BF16": np.uint16, "F32": np.float32}[info["dtype"]]
            raw = np.frombuffer(blob, dtype, (end - start) // np.dtype(dtype).itemsize, 8 + n + start)
            if info["dtype"] == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            out[key] = raw.reshape(info["shape"])
    return out


def round_to_dtype(x, dtype):
    """float32 values rounded to nearest, ties to even, into a stored weight dtype (bf16 as raw bits):
    fp16 by numpy's own conversion; bf16 by np.rint (ties to even) on the multiple of bf16's spacing,
    2^(e - 8) for x = m 2^e, m in [0.5, 1) (subnormals: the spacing of the smallest normal)."""
    if dtype == np.float32:
        return x
    if dtype == np.float16:
        return x.astype(np.float16)
    _, e = np.frexp(x.astype(np.float64))
    spacing = np.ldexp(1.0, np.maximum(e, -125) - 8)
    rounded = (np.rint(x / spacing) * spacing).astype(np.float32).view(np.uint32)
    assert not np.any(rounded & 0xFFFF), "a rounded value does not fit bf16"
    return (rounded >> 16).astype(np.uint16)


def test_export_dtypes():
    """Every exported value: each weight matrix equal, bit for bit, to its source rounded to nearest
    even in the file's dtype (numpy), the norms and biases exactly float32, k_scale by its rule."""
    checked = 0
    for name in ["qwen3_gqa2_bf16", "qwen2_gqa7_bias_fp32", "qwen3_mha_untied_fp32_sharded"]:
        src = source_tensors(os.path.join(FIXTURES, name))
        layer = lambda l, key: src[f"model.layers.{l}.{key}"]
        for dtype in ("fp32", "bf16", "fp16"):
            h, t, _ = checkpoint(export(name, dtype))
            L, hd = h["n_layers"], h["head_dim"]
            assert h["wdtype"] == {"fp32": 0, "bf16": 1, "fp16": 2}[dtype], h
            per_layer = lambda *keys: np.stack([np.concatenate([layer(l, k) for k in keys]) for l in range(L)])
            expected = {
                "embedding": src["model.embed_tokens.weight"],
                "rms_att": per_layer("input_layernorm.weight"),
                "rms_ffn": per_layer("post_attention_layernorm.weight"),
                "wqkv": per_layer(*(f"self_attn.{p}_proj.weight" for p in "qkv")),
                "wo": per_layer("self_attn.o_proj.weight"),
                "w_gate_up": per_layer("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                "w_down": per_layer("mlp.down_proj.weight"),
                "rms_final": src["model.norm.weight"],
            }
            if "q_norm" in t:
                expected.update(q_norm=per_layer("self_attn.q_norm.weight"), k_norm=per_layer("self_attn.k_norm.weight"))
                bound = np.abs(expected["k_norm"]).max(axis=1) * np.sqrt(hd) * np.sqrt(2)
                expected["k_scale"] = [next(2.0 ** i for i in range(128) if b / 2.0 ** i <= 4096) for b in bound]
            else:
                expected["k_scale"] = np.ones(L)
            if "bqkv" in t:
                expected["bqkv"] = per_layer(*(f"self_attn.{p}_proj.bias" for p in "qkv"))
            if "lm_head" in t:
                expected["lm_head"] = src["lm_head.weight"]
            assert set(expected) == set(t), (sorted(expected), sorted(t))
            for key, want in expected.items():
                want = np.asarray(want, np.float32).reshape(t[key].shape)
                if t[key].dtype != np.float32 or key in ("embedding", "wqkv", "wo", "w_gate_up", "w_down", "lm_head"):
                    want = round_to_dtype(want, t[key].dtype)
                bits = lambda a: a.reshape(-1).view(np.uint16 if a.itemsize == 2 else np.uint32)
                bad = np.flatnonzero(bits(want) != bits(t[key]))
                assert len(bad) == 0, f"{name} as {dtype}: {key} differs at {len(bad)} of {want.size} values, first " \
                    f"flat index {bad[0]}: file {t[key].flat[bad[0]]}, expected {want.flat[bad[0]]}"
                checked += want.size
    # bf16 weights are exact in fp32 and (at these magnitudes) in fp16: same logits, same HF parity
    name = "qwen3_gqa2_bf16"
    ids = reference(name)["ids"]
    own, _ = logits_of(export(name), ids)
    as_fp32, _ = logits_of(export(name, "fp32"), ids)
    assert np.array_equal(own, as_fp32), "bf16 weights exported as fp32 changed the logits"
    as_fp16, _ = logits_of(export(name, "fp16"), ids)
    compare_logits(name, as_fp16)
    print(f"     {checked} exported values equal to numpy's rounding of the source")


def patched_fixture(name, key, factor):
    """A copy of a fixture folder with one bf16 tensor multiplied by factor (HF rounding)."""
    dst = os.path.join(TMP, f"{name}_x{factor:g}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    path = os.path.join(dst, "model.safetensors")
    blob = bytearray(open(path, "rb").read())
    (n,) = struct.unpack_from("<Q", blob)
    info = json.loads(blob[8:8 + n])[key]
    start, end = (8 + n + o for o in info["data_offsets"])
    x = bf16_to_f32(np.frombuffer(bytes(blob[start:end]), dtype=np.uint16)) * factor
    blob[start:end] = f32_to_bf16(x).tobytes()
    open(path, "wb").write(blob)
    return dst


def test_k_scale():
    """k_norm gains x1000 (|K| up to ~1.5e6, past fp16): export picks a power-of-two k_scale
    that keeps cached K under 4096, and the CPU logits are bit-identical with and without it."""
    name = "qwen3_gqa2_bf16"
    folder = patched_fixture(name, "model.layers.0.self_attn.k_norm.weight", 1000)
    out = os.path.join(TMP, "k_stress.bin")
    rc, _, err = run([sys.executable, os.path.join(ROOT, "export.py"), folder, out])
    assert rc == 0, err
    h, t, _ = checkpoint(out)
    L, hd, k_norm, k_scale = h["n_layers"], h["head_dim"], t["k_norm"], t["k_scale"]
    for layer in range(L):
        bound = np.abs(k_norm[layer]).max() * np.sqrt(hd) * np.sqrt(2)
        s = k_scale[layer]
        assert s >= 1 and np.log2(s) == int(np.log2(s)), f"k_scale {s} is not a power of two"
        assert bound / s <= 4096 and (s == 1 or bound / s > 2048), f"layer {layer}: bound {bound}, k_scale {s}"
    assert k_scale[0] > 1, "the x1000 layer got no scale"
    ids = reference(name)["ids"]
    scaled, _ = logits_of(out, ids)
    out_path = os.path.join(TMP, "logits.bin")
    rc, _, err = run([RUNCPU, out, "-m", "logits", "-f", write_ids(ids), "-o", out_path, "-K", "0"])
    assert rc == 0, err
    unscaled = np.fromfile(out_path, dtype=np.float32).reshape(scaled.shape)
    assert np.array_equal(scaled, unscaled), "k_scale changed the float32 result"
    assert np.all(np.isfinite(scaled))
    print(f"     k_scale per layer {k_scale.tolist()}")


def planted(name, tensor, index, value, fixture="qwen3_gqa2_bf16"):
    """An exported fixture with one value of a tensor replaced (bf16 tensors: raw bits)."""
    _, t, blob = checkpoint(export(fixture))
    t[tensor][index] = value
    path = os.path.join(TMP, f"planted_{name}.bin")
    blob.tofile(path)
    return path


def test_k_scale_validated_at_load():
    """k_scale must be a finite power of two >= 1 (the cache holds k / k_scale): anything else is
    refused at load with the layer named, whichever mode runs."""
    ids = write_ids([1, 2, 3])
    for value in (0.0, float("nan"), -1.0, 3.0, 0.5, float("inf"), -2.0):
        path = planted("k_scale", "k_scale", 1, value)
        for args in (["-m", "logits", "-f", ids], ["-i", "a b", "-n", "2"]):
            rc, _, err = run([RUNCPU, path] + args)
            assert_one_error_line(rc, err, f"k_scale {value}")
            assert "layer 1" in err and "k_scale" in err, f"k_scale {value}: {err}"
    for value in (1.0, 2.0, 2.0 ** 20):  # powers of two load, and k_scale does not change the float32 math
        ours, _ = logits_of(planted("k_scale", "k_scale", 1, value), reference("qwen3_gqa2_bf16")["ids"])
        compare_logits("qwen3_gqa2_bf16", ours)


def test_non_finite_logits_stop_with_the_position():
    """NaN planted in the checkpoint: greedy and sampled generation, logits and ppl mode each stop with
    one error line naming the first position whose logits are NaN or inf (never token 0 or a sample
    read out of bounds)."""
    a_b = [int(t) for t in run([RUNCPU, "-m", "tokenize", "-i", "a b"])[1].split()]
    assert len(a_b) == 2 and max(a_b) < 512, a_b  # ids of the fixtures' 512-token vocabulary
    # NaN in the input embedding of " b" (untied: the LM head stays finite): the logits are finite at
    # position 0, NaN from position 1 on
    row_nan = planted("embedding", "embedding", (a_b[1], 5), np.nan, "qwen3_mha_untied_fp32_sharded")
    cases = {"greedy": ["-i", "a b", "-t", "0"], "sampled": ["-i", "a b", "-t", "1", "-s", "1"],
             "sampled, top-p and min-p": ["-i", "a b", "-t", "0.7", "-p", "0.5", "-P", "0.1", "-s", "2"],
             "chat": ["-m", "chat", "-i", "a b", "-t", "1", "-s", "3"]}
    for what, args in cases.items():
        rc, out, err = run([RUNCPU, row_nan] + args, stdin=b"")
        assert_one_error_line(rc, err, what)
    # generate and chat feed a prompt whose last token is " b"; logits mode names position 7 of 8 ids
    rc, _, err = run([RUNCPU, row_nan, "-i", "a b", "-t", "0"])
    assert "position 1 " in err and "not finite" in err, err
    rc, _, err = run([RUNCPU, row_nan, "-m", "logits", "-f", write_ids([1, 2, 3, 4, 5, 6, 7, a_b[1], 9])])
    assert_one_error_line(rc, err, "logits mode")
    assert "position 7 " in err, err
    # NaN in the final norm: every position's logits are NaN
    all_nan = planted("rms_final", "rms_final", 3, float("nan"))
    text = os.path.join(TMP, "a_b.txt")
    open(text, "w").write("a b a b a b")
    for what, args in {"greedy": ["-i", "a b", "-t", "0"], "sampled": ["-i", "a b", "-t", "1", "-s", "1"],
                       "ppl": ["-m", "ppl", "-f", text], "logits": ["-m", "logits", "-f", write_ids([1, 2])]}.items():
        rc, _, err = run([RUNCPU, all_nan] + args)
        assert_one_error_line(rc, err, f"rms_final NaN, {what}")
        assert "position 0 " in err, err


def test_sampler_always_keeps_the_top_token():
    """Every embedding row equal (tied: every logit equal): a uniform distribution, where top-p 1e-6's
    early cutoff (1 - top_p) / (vocab - 1) lies above every probability. HF's top-p keeps one token
    whatever the cutoff; so must the sampler (before: no candidate, candidates[-1] read, ASan
    heap-buffer-overflow), and with one token left sampling is greedy: torch.argmax's lowest index, 0."""
    uniform = planted("uniform", "embedding", slice(None), 0x3C00)  # bf16 0.0078125 everywhere
    for seed in (1, 2, 3):
        rc, _, err = run([RUNCPU, uniform, "-i", "a b", "-t", "1", "-p", "0.000001", "-n", "3", "-v", "1", "-s", str(seed)])
        assert rc == 0 and "Sanitizer" not in err, err[-800:]
        line = next(l for l in err.splitlines() if l.startswith("generated ids:"))
        assert line.split(":")[1].split() == ["0", "0", "0"], line


def corrupt(name, data):
    path = os.path.join(TMP, f"bad_{name}.bin")
    open(path, "wb").write(data)
    return path


def test_bad_checkpoints():
    good = open(export("qwen3_gqa2_bf16"), "rb").read()
    fields = ["magic", "version", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
              "vocab_size", "max_seq_len"]

    def with_field(field, value):
        b = bytearray(good)
        struct.pack_into("<i" if fields.index(field) >= 2 else "<I", b, 4 * fields.index(field), value)
        return bytes(b)

    cases = {
        "empty": b"",
        "wrong_magic": with_field("magic", 0x12345678),
        "wrong_version": with_field("version", 99),
        "trunc_100": good[:100], "trunc_256": good[:256], "trunc_half": good[: len(good) // 2],
        "trunc_minus1": good[:-1], "extra_bytes": good + b"\0" * 256,
        "zero_layers": with_field("n_layers", 0), "huge_layers": with_field("n_layers", 1 << 30),
        "zero_heads": with_field("n_heads", 0), "neg_dim": with_field("dim", -64),
        "heads_not_multiple": with_field("n_kv_heads", 3), "odd_head_dim": with_field("head_dim", 33),
        "huge_vocab": with_field("vocab_size", 1 << 30), "more_layers": with_field("n_layers", 3),
        "zero_seq": with_field("max_seq_len", 0), "bad_dtype": good[:48] + struct.pack("<I", 7) + good[52:],
        "nan_theta": good[:40] + struct.pack("<f", float("nan")) + good[44:],
        "bad_flags": good[:52] + struct.pack("<I", 64) + good[56:],
    }
    ids = write_ids([1, 2, 3])
    for case, data in cases.items():
        rc, _, err = run([RUNCPU, corrupt(case, data), "-m", "logits", "-f", ids])
        assert_one_error_line(rc, err, case)
    for case, path in {"directory": TMP, "missing": os.path.join(TMP, "no_such.bin")}.items():
        rc, _, err = run([RUNCPU, path, "-m", "logits", "-f", ids])
        assert_one_error_line(rc, err, case)
    print(f"     {len(cases) + 2} bad checkpoints rejected with one error line each")


def test_bad_token_ids():
    model = export("qwen3_gqa2_bf16")
    cases = {"out_of_range": ("1 2 512", "id 512 at position 2 "), "negative": ("-1", "id -1 at position 0 "),
             "not_a_number": ("1 x 2", 'token 1 ("x")'), "too_large": ("7 99999999999", 'token 1 ("99999999999")'),
             "empty": ("", "no token ids")}
    for case, (text, says) in cases.items():
        rc, _, err = run([RUNCPU, model, "-m", "logits", "-f", write_ids([]) if not text else write_ids([text])])
        assert_one_error_line(rc, err, case)
        assert says in err, f"{case}: the error does not name the position and the id: {err}"
    rc, _, err = run([RUNCPU, model, "-m", "logits", "-f", write_ids(list(range(20))), "-c", "8"])
    assert_one_error_line(rc, err, "more ids than the context")


def test_export_rejections():
    def export_error(folder, what):
        out = os.path.join(TMP, "rejected.bin")
        rc, _, err = run([sys.executable, os.path.join(ROOT, "export.py"), folder, out])
        assert_one_error_line(rc, err, what)
        assert not os.path.exists(out) and not os.path.exists(out + ".tmp"), f"{what}: left a partial file"
        return err

    def variant(name, **config_changes):
        dst = os.path.join(TMP, "variant")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(FIXTURES, name), dst)
        cfg = json.load(open(os.path.join(dst, "config.json")))
        cfg.update(config_changes)
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
        return dst

    base = "qwen3_gqa2_bf16"
    assert "model.layers.2" in export_error(variant(base, num_hidden_layers=3), "missing tensor")
    assert "disagrees" in export_error(variant(base, hidden_size=96), "shape mismatch")
    assert "architecture" in export_error(variant(base, architectures=["LlamaForCausalLM"]), "unknown architecture")
    assert "multiple" in export_error(variant(base, num_key_value_heads=3), "heads not a multiple")
    assert "rope" in export_error(variant(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling")
    # an unsupported dtype in the safetensors header
    folder = variant(base)
    path = os.path.join(folder, "model.safetensors")
    blob = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", blob)
    header = blob[8:8 + n].replace(b'"BF16"', b'"F64" ', 1)
    open(path, "wb").write(blob[:8] + header + blob[8 + n:])
    assert "dtype" in export_error(folder, "unsupported dtype")
    open(path, "wb").write(blob[: len(blob) // 2])
    export_error(folder, "truncated safetensors")
    os.remove(path)
    export_error(folder, "missing safetensors")
    export_error(os.path.join(TMP, "no_such_folder"), "missing folder")
