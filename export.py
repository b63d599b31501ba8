"""Export a Hugging Face Qwen3 (or Qwen2/Qwen2.5) model folder to one flat checkpoint for run.c.

    python3 export.py MODEL_DIR model.bin [--dtype bf16|fp16|fp32|int8]
    python3 export.py --tokenizer tokenizer.json tokenizer.bin

Reads config.json and the safetensors files itself (numpy only: no torch, no safetensors package),
one tensor at a time, so peak memory stays near the largest tensor. The layout is in README.md.
"""
import argparse
import json
import lzma
import math
import os
import struct
import sys

try:
    import numpy as np
except ImportError:
    sys.exit("error: export.py needs numpy: apt-get install python3-numpy or pip install numpy")

MAGIC = 0x334E5751  # b"QWN3" little-endian
VERSION, INT8_VERSION = 1, 2  # int8 files are version 2; fp32, bf16 and fp16 keep version 1's layout
HEADER_BYTES = 256
ALIGN = 256
DTYPES = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3}
Q8_BLOCK = 32  # int8 (GGUF's Q8_0): one fp16 scale per 32 consecutive weights of a row
Q8_MAX_ABS = 65504.0 * 127  # the largest |weight| whose scale (max |x| / 127) fits fp16
FLAG_TIED, FLAG_QK_NORM, FLAG_QKV_BIAS = 1, 2, 4
K_LIMIT = 4096.0  # cached K is kept below this magnitude (fp16's max is 65504)


class ExportError(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# safetensors reading

def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def to_f32(arr, src_dtype):
    return bf16_to_f32(np.asarray(arr)) if src_dtype == "BF16" else np.asarray(arr, dtype=np.float32)


def f32_to_bf16(x):
    """Round to nearest even, as torch's .to(torch.bfloat16) does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class SafeTensors:
    """The tensors of every *.safetensors file of a folder, mapped, never loaded whole."""

    RAW = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}

    def __init__(self, folder):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            files = sorted(set(json.load(open(index))["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        self.tensors = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise ExportError(f"{path}: missing safetensors file")
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ExportError(f"{path}: truncated safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise ExportError(f"{path}: header length {n} exceeds the file")
                meta = json.loads(f.read(n))
            for key, info in meta.items():
                if key == "__metadata__":
                    continue
                dtype = info["dtype"]
                if dtype not in self.RAW:
                    raise ExportError(f"{key}: unsupported dtype {dtype}")
                start, end = info["data_offsets"]
                count = math.prod(info["shape"])
                if end - start != count * np.dtype(self.RAW[dtype]).itemsize or 8 + n + end > size:
                    raise ExportError(f"{key}: data offsets disagree with its shape or the file size")
                self.tensors[key] = (path, 8 + n + start, dtype, tuple(info["shape"]))

    def get(self, key, shape):
        """The tensor as a float32-convertible array mapped from disk, checked against shape."""
        if key not in self.tensors:
            raise ExportError(f"missing tensor {key}")
        path, offset, dtype, stored = self.tensors[key]
        if stored != tuple(shape):
            raise ExportError(f"{key}: shape {list(stored)} disagrees with the config's {list(shape)}")
        return np.memmap(path, dtype=self.RAW[dtype], mode="r", offset=offset, shape=stored), dtype


# ----------------------------------------------------------------------------------------------
# config

def read_config(folder):
    if not os.path.isdir(folder):
        raise ExportError(f"{folder}: {'not a folder' if os.path.exists(folder) else 'no such folder'} "
                          "(expected a Hugging Face model folder)")
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ExportError(f"{path}: missing")
    c = json.load(open(path))
    arch = (c.get("architectures") or [""])[0]
    if arch not in ("Qwen3ForCausalLM", "Qwen2ForCausalLM"):
        raise ExportError(f"unsupported architecture {arch!r} (Qwen3ForCausalLM or Qwen2ForCausalLM)")
    qwen3 = arch == "Qwen3ForCausalLM"
    rope = c.get("rope_parameters") or {}
    theta = c.get("rope_theta", rope.get("rope_theta"))
    scaling = c.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default" or \
            rope.get("rope_type", "default") != "default":
        raise ExportError("rope scaling is not supported")
    if c.get("use_sliding_window"):
        raise ExportError("sliding-window attention is not supported")
    n_heads = c["num_attention_heads"]
    cfg = dict(
        dim=c["hidden_size"], hidden_dim=c["intermediate_size"], n_layers=c["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads", n_heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads, vocab_size=c["vocab_size"],
        max_seq_len=c["max_position_embeddings"], rope_theta=float(theta), eps=float(c["rms_norm_eps"]),
        tied=bool(c.get("tie_word_embeddings", False)), qk_norm=qwen3,
        bias=(not qwen3) or bool(c.get("attention_bias", False)),
        source_dtype=c.get("dtype", c.get("torch_dtype", "float32")),
    )
    for key in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
                "max_seq_len"):
        if not isinstance(cfg[key], int) or not 0 < cfg[key] < 2**31:
            raise ExportError(f"config: {key} = {cfg[key]!r} is out of range")
    if cfg["n_heads"] % cfg["n_kv_heads"] or cfg["head_dim"] % 2:
        raise ExportError("config: n_heads must be a multiple of n_kv_heads and head_dim even")
    return cfg


# ----------------------------------------------------------------------------------------------
# writing

def quantize_q8_0(name, x):
    """float32 rows (n, cols), cols a multiple of Q8_BLOCK -> (int8 (n, cols), fp16 scales (n, cols / 32)),
    exactly as ggml's quantize_row_q8_0_ref, block by block in float32: d = max |x| / 127,
    q = roundf(x * (1 / d)), scale = fp16(d) (nearest even)."""
    blocks = x.reshape(x.shape[0], -1, Q8_BLOCK)
    amax = np.abs(blocks).max(axis=2)
    if amax.max(initial=0) > Q8_MAX_ABS:
        raise ExportError(f"{name}: |weight| {amax.max():g} is beyond int8's range (its fp16 scale would "
                          f"exceed 65504); export as bf16")
    d = amax / np.float32(127)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(1) / d
    # ggml's `d ? 1/d : 0`; a d so small (max |x| < 3.7e-37) that 1/d overflows float32 is taken as 0
    # too, giving q = 0 (instead of roundf(inf) or NaN; its fp16 scale is 0 anyway)
    inv[~np.isfinite(inv)] = 0
    v = blocks * inv[..., None]
    whole = np.trunc(v)
    q = whole + np.where(np.abs(v - whole) >= 0.5, np.sign(v), 0)  # roundf: halves away from zero
    return q.astype(np.int8).reshape(x.shape), d.astype(np.float16)


class Writer:
    def __init__(self, f, out_dtype):
        self.f, self.out_dtype = f, out_dtype

    def align(self):
        pad = -self.f.tell() % ALIGN
        self.f.write(b"\0" * pad)

    @staticmethod
    def chunks(name, arr, src_dtype):
        """arr as float32 rows, about 32 MB at a time, checked finite."""
        arr = arr.reshape(arr.shape[0] if arr.ndim > 1 else 1, -1)
        step = max(1, (32 << 20) // (4 * arr.shape[1]))
        for i in range(0, arr.shape[0], step):
            x = to_f32(arr[i:i + step], src_dtype)
            if not np.all(np.isfinite(x)):
                raise ExportError(f"{name}: holds inf or NaN")
            yield x

    def rows(self, name, arr, src_dtype, as_f32=False):
        """Append arr converted to the output dtype (or float32)."""
        dt = "fp32" if as_f32 else self.out_dtype
        for x in self.chunks(name, arr, src_dtype):
            if dt == "fp32":
                self.f.write(x.tobytes())
            elif dt == "bf16":
                self.f.write(f32_to_bf16(x).tobytes())
            else:
                if np.abs(x).max(initial=0) > 65504:
                    raise ExportError(f"{name}: values beyond fp16's range; export as bf16")
                self.f.write(x.astype(np.float16).tobytes())

    def quantized(self, tensors):
        """int8: the matrices [(key, array, src_dtype)] stacked, then their scales as the next (aligned)
        tensor. Each chunk's scales are written straight to their place further on, so memory stays
        bounded however large the stack."""
        at = self.f.tell()
        scales_at = at + sum(arr.size for _, arr, _ in tensors)
        scales_at += -scales_at % ALIGN  # the gap before it reads back as zeros
        for key, arr, src in tensors:
            for x in self.chunks(key, arr, src):
                q, scales = quantize_q8_0(key, x)
                self.f.seek(at)
                self.f.write(q.tobytes())
                self.f.seek(scales_at)
                self.f.write(scales.tobytes())
                at, scales_at = at + q.nbytes, scales_at + scales.nbytes


def k_scale_for(k_norm_weight, head_dim):
    """The power of two that keeps cached K = k / k_scale below K_LIMIT in magnitude.
    After k_norm, |k_i| <= |w_i| * sqrt(head_dim); RoPE mixes pairs, which adds at most sqrt(2)."""
    bound = float(np.abs(k_norm_weight).max()) * math.sqrt(head_dim) * math.sqrt(2)
    return 2.0 ** max(0, math.ceil(math.log2(bound / K_LIMIT))) if bound > 0 else 1.0


def export_model(folder, out_path, out_dtype=None):
    cfg = read_config(folder)
    st = SafeTensors(folder)
    if out_dtype is None:
        out_dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(cfg["source_dtype"], "fp32")
    D, H, L, hd = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["head_dim"]
    nq, nkv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    if out_dtype == "int8" and (D % Q8_BLOCK or H % Q8_BLOCK or nq % Q8_BLOCK):
        raise ExportError(f"int8 needs dim, hidden_dim and n_heads * head_dim to be multiples of {Q8_BLOCK} "
                          f"(they are {D}, {H}, {nq})")
    layer = lambda i, s: f"model.layers.{i}.{s}"

    flags = (FLAG_TIED if cfg["tied"] else 0) | (FLAG_QK_NORM if cfg["qk_norm"] else 0) | \
            (FLAG_QKV_BIAS if cfg["bias"] else 0)
    # The tensors in file order: (name, [(key, shape), ...] stacked in that order, float32?)
    groups = [("embedding", [("model.embed_tokens.weight", (cfg["vocab_size"], D))], False),
              ("rms_att", [(layer(i, "input_layernorm.weight"), (D,)) for i in range(L)], True),
              ("rms_ffn", [(layer(i, "post_attention_layernorm.weight"), (D,)) for i in range(L)], True)]
    if cfg["qk_norm"]:
        groups += [("q_norm", [(layer(i, "self_attn.q_norm.weight"), (hd,)) for i in range(L)], True),
                   ("k_norm", [(layer(i, "self_attn.k_norm.weight"), (hd,)) for i in range(L)], True)]
    groups.append(("k_scale", None, True))
    if cfg["bias"]:
        groups.append(("bqkv", [(layer(i, f"self_attn.{p}_proj.bias"), (n,)) for i in range(L)
                                for p, n in (("q", nq), ("k", nkv), ("v", nkv))], True))
    groups += [
        ("wqkv", [(layer(i, f"self_attn.{p}_proj.weight"), (n, D)) for i in range(L)
                  for p, n in (("q", nq), ("k", nkv), ("v", nkv))], False),
        ("wo", [(layer(i, "self_attn.o_proj.weight"), (D, nq)) for i in range(L)], False),
        ("w_gate_up", [(layer(i, f"mlp.{p}_proj.weight"), (H, D)) for i in range(L)
                       for p in ("gate", "up")], False),
        ("w_down", [(layer(i, "mlp.down_proj.weight"), (D, H)) for i in range(L)], False),
        ("rms_final", [("model.norm.weight", (D,))], True)]
    if not cfg["tied"]:
        groups.append(("lm_head", [("lm_head.weight", (cfg["vocab_size"], D))], False))
    for _, parts, _ in groups:  # every tensor must exist with its shape before anything is written
        for key, shape in parts or []:
            st.get(key, shape)

    tmp = out_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            w = Writer(f, out_dtype)
            for name, parts, as_f32 in groups:
                w.align()
                print(f"export: {name}", file=sys.stderr)
                if name == "k_scale":
                    scales = [k_scale_for(to_f32(*st.get(layer(i, "self_attn.k_norm.weight"), (hd,))), hd)
                              if cfg["qk_norm"] else 1.0 for i in range(L)]
                    f.write(np.array(scales, dtype=np.float32).tobytes())
                    continue
                if out_dtype == "int8" and not as_f32:
                    w.quantized([(key, *st.get(key, shape)) for key, shape in parts])
                    continue
                for key, shape in parts:
                    arr, src = st.get(key, shape)
                    w.rows(key, arr, src, as_f32)
            w.align()
            size = f.tell()
            f.seek(0)
            version = INT8_VERSION if out_dtype == "int8" else VERSION
            f.write(struct.pack("<II8iffIIQ", MAGIC, version, D, H, L, cfg["n_heads"], cfg["n_kv_heads"],
                                hd, cfg["vocab_size"], cfg["max_seq_len"], cfg["rope_theta"], cfg["eps"],
                                DTYPES[out_dtype], flags, size))
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    print(f"export: wrote {out_path} ({size / 1e6:.1f} MB, {out_dtype})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# tokenizer.json (Qwen2/Qwen3 byte-level BPE) -> tokenizer.bin, read by tokenizer.h.
#
# Binary layout, all integers little-endian uint32, sections back to back in this order:
#
#     field                       count                what
#     magic                       4 bytes              b"QTOK"
#     version                     1                    1
#     n_tokens                    1                    ids 0..n_tokens-1 all have text (vocab + added tokens)
#     n_merges                    1                    merge rank r joins merges[r] into id 256 + r
#     n_added                     1                    added tokens
#     n_letters, n_numbers,       1 each               range counts of the Unicode tables below
#       n_spaces, n_ccc,
#       n_decomps, n_compositions
#     n_piece_bytes               1                    size of piece_bytes
#     piece_offsets               n_tokens + 1         token i is piece_bytes[offsets[i] : offsets[i+1]]
#     piece_bytes                 n_piece_bytes bytes  raw token bytes (ByteLevel undone), zero-padded to 4
#     merges                      n_merges x 2         (left id, right id)
#     added                       n_added x 2          (id, flags): flags bit 0 = special
#     letters                     n_letters x 2        (first, last) code points of \p{L}, sorted, disjoint
#     numbers                     n_numbers x 2        (first, last) of \p{N}
#     spaces                      n_spaces x 2         (first, last) of White_Space (the regex's \s)
#     ccc                         n_ccc x 3            (first, last, canonical combining class), nonzero only
#     decomps                     n_decomps x 3        (code point, first, second or 0): canonical, one level,
#                                                      sorted by code point (Hangul syllables are computed)
#     compositions                n_compositions x 3   (first, second, composite) sorted by (first, second):
#                                                      primary composites, composition exclusions removed
#
# The Unicode tables (letters, numbers, white space, combining classes, decompositions, compositions) are
# those of Hugging Face tokenizers' regex and NFC, committed as data/unicode_tables.json.xz (built once by
# tests/gen_unicode_tables.py, which says how), so the output does not depend on the Python that runs this.
TOKENIZER_MAGIC = b"QTOK"
TOKENIZER_VERSION = 1
UNICODE_TABLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "unicode_tables.json.xz")
UNICODE_TABLE_NAMES = ("letters", "numbers", "spaces", "ccc", "decomps", "compositions")
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode():
    """GPT-2's map from each byte to the printable character that stands for it in vocab strings."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def unicode_tables():
    """The six tables in tokenizer.bin's order, each a list of (first, last[, value]) tuples."""
    with lzma.open(UNICODE_TABLES) as f:
        tables = json.load(f)
    return [[tuple(row) for row in tables[name]] for name in UNICODE_TABLE_NAMES]


def load_tokenizer_json(path):
    """-> (list of token bytes indexed by id, merges as id pairs, [(id, special)]), checking the BPE facts."""
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    # tokenizer.h hard-codes this pipeline: refuse any other rather than export something that encodes wrongly
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if tok["normalizer"] != {"type": "NFC"} or \
            tok["pre_tokenizer"] != {"type": "Sequence", "pretokenizers": [split, byte_level]}:
        raise ExportError(f"{path}: not the Qwen2/Qwen3 normalizer and pre-tokenizer (NFC, Split, ByteLevel)")
    model = tok["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ExportError(f"{path}: not a plain byte-level BPE model")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = model["vocab"]
    pieces = [None] * len(vocab)
    for text, i in vocab.items():
        if not 0 <= i < len(vocab) or pieces[i] is not None:
            raise ExportError(f"{path}: vocab ids are not 0..{len(vocab) - 1}, each once (id {i})")
        pieces[i] = bytes(byte_of[c] for c in text)
    if sorted(pieces[:256]) != [bytes([b]) for b in range(256)]:
        raise ExportError(f"{path}: ids 0..255 are not the 256 bytes")

    merges = []
    for rank, m in enumerate(model["merges"]):
        left, right = m.split(" ") if isinstance(m, str) else m
        want = 256 + rank
        if vocab.get(left + right) != want:
            raise ExportError(f"{path}: merge rank {rank} ({left!r} {right!r}) gives id "
                             f"{vocab.get(left + right)}, expected {want}: tokenizer.h assumes id = 256 + rank")
        merges.append((vocab[left], vocab[right]))
    if 256 + len(merges) != len(vocab):
        raise ExportError(f"{path}: {len(vocab)} vocab entries but {len(merges)} merges: "
                         f"ids >= 256 must each come from one merge")

    added = []
    for a in sorted(tok["added_tokens"], key=lambda a: a["id"]):
        if a["id"] != len(pieces):
            raise ExportError(f"{path}: added token {a['content']!r} has id {a['id']}, "
                             f"expected {len(pieces)} (ids must follow the vocab without gaps)")
        if a["normalized"] or a["lstrip"] or a["rstrip"] or a["single_word"]:
            raise ExportError(f"{path}: added token {a['content']!r} has options tokenizer.h lacks")
        pieces.append(a["content"].encode("utf-8"))
        added.append((a["id"], 1 if a["special"] else 0))
    return pieces, merges, added


def export_tokenizer(tokenizer_json_path, out_path):
    pieces, merges, added = load_tokenizer_json(tokenizer_json_path)
    letters, numbers, spaces, ccc, decomps, compositions = unicode_tables()

    piece_bytes = b"".join(pieces)
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    padding = b"\0" * (-len(piece_bytes) % 4)

    def u32s(rows):
        flat = [x for row in rows for x in (row if isinstance(row, tuple) else (row,))]
        return struct.pack(f"<{len(flat)}I", *flat)

    header = TOKENIZER_MAGIC + u32s([TOKENIZER_VERSION, len(pieces), len(merges), len(added), len(letters), len(numbers),
                           len(spaces), len(ccc), len(decomps), len(compositions), len(piece_bytes)])
    body = [u32s(offsets), piece_bytes + padding, u32s(merges), u32s(added), u32s(letters), u32s(numbers),
            u32s(spaces), u32s(ccc), u32s(decomps), u32s(compositions)]
    with open(out_path, "wb") as f:
        f.write(header + b"".join(body))
    print(f"export: wrote {out_path}: {len(pieces)} tokens, {len(merges)} merges, {len(added)} added, "
          f"unicode tables {len(letters)}/{len(numbers)}/{len(spaces)}/{len(ccc)}/{len(decomps)}/{len(compositions)}",
          file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other error (argparse's own adds the usage)
        sys.exit(f"error: export: {message} (python3 export.py -h for help)")


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="Hugging Face model folder (or tokenizer.json with --tokenizer)")
    ap.add_argument("output")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the model's own)")
    ap.add_argument("--tokenizer", action="store_true", help="export tokenizer.json to tokenizer.bin")
    args = ap.parse_args()
    try:
        if os.path.isdir(args.output):
            raise ExportError(f"{args.output}: is a directory (give the output file's name)")
        if args.tokenizer:
            export_tokenizer(args.source, args.output)
        else:
            export_model(args.source, args.output, args.dtype)
    except (ExportError, OSError, KeyError, ValueError) as e:
        msg = f"missing {'tokenizer.json' if args.tokenizer else 'config'} key {e}" if isinstance(e, KeyError) else str(e)
        print(f"error: export: {msg}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
