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


def test_export_dtypes():
    # bf16 weights are exact in fp32 and (at these magnitudes) in fp16: same logits, same HF parity
    name = "qwen3_gqa2_bf16"
    ids = reference(name)["ids"]
    own, _ = logits_of(export(name), ids)
    as_fp32, _ = logits_of(export(name, "fp32"), ids)
    assert np.array_equal(own, as_fp32), "bf16 weights exported as fp32 changed the logits"
    as_fp16, _ = logits_of(export(name, "fp16"), ids)
    compare_logits(name, as_fp16)
    # fp32 weights rounded to bf16: the file holds round-to-nearest-even bf16 values
    path = export("qwen2_gqa7_bias_fp32", "bf16")
    hdr = struct.unpack_from("<II8iffIIQ", open(path, "rb").read(256))
    assert hdr[12] == 1 and os.path.getsize(path) == hdr[14], f"bf16 header {hdr}"


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
    blob = open(out, "rb").read()
    hdr = struct.unpack_from("<II8iffIIQ", blob)
    L, hd = hdr[4], hdr[7]
    # the layout: embedding, rms_att, rms_ffn, q_norm, k_norm, k_scale (each 256-aligned)
    at = 256
    offsets = []
    for size in (hdr[8] * hdr[2] * 2, L * hdr[2] * 4, L * hdr[2] * 4, L * hd * 4, L * hd * 4, L * 4):
        at = (at + 255) // 256 * 256
        offsets.append(at)
        at += size
    k_norm = np.frombuffer(blob, np.float32, L * hd, offsets[4]).reshape(L, hd)
    k_scale = np.frombuffer(blob, np.float32, L, offsets[5])
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
    for case, text in {"out_of_range": "1 2 512", "negative": "-1", "not_a_number": "1 x 2", "empty": ""}.items():
        rc, _, err = run([RUNCPU, model, "-m", "logits", "-f", write_ids([]) if not text else write_ids([text])])
        assert_one_error_line(rc, err, case)
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
