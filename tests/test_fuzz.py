"""A seeded mutation fuzzer for the loaders of the two files a user hands us: the checkpoint (run.c) and
tokenizer.bin (tokenizer.h). Each case damages a valid file (1 to 3 of: a bit flipped; a byte or a uint32
word overwritten with a boundary value, a float, a word from elsewhere in the same section or its
neighbour +-1; two words swapped; a section's count changed with the section grown or shrunk to match;
the file cut or extended) and runs it. It must either work or stop with exactly one 'error:' line and
exit status 1, with no sanitizer report:
  - tokenizer.bin (the demo's, and Qwen3's one case in 4): the test_tokenizer.c driver built with
    ASan + UBSan loads it and encodes a text holding the code points written near the damage, so that
    a damaged Unicode table gets used, not only loaded; one case in 4 runs RUNCPU -m tokenize -z instead;
  - the checkpoint: RUNCPU -m logits -n 2 on a damaged export of a tiny fixture (RUNCPU is
    build/runcpu-asan under make asan), the header's 64 bytes hit two times in three.
The seed is fixed, so the suite is the same each run; FUZZ_SEED=S FUZZ_CASES=N explore further
(python3 tests/run_tests.py test_fuzz). A failure names its seed, case and mutations, and its file stays
in tests/tmp/fuzz/.
"""
import math
import os
import random
import shutil
import struct
import subprocess

from harness import RUNCPU, TMP, assert_one_error_line, export, write_ids
from test_tokenizer import HEADER_FIELDS, TOKENIZERS, driver, sections

# seed 7: its tokenizer case 186 crashed tokenizer.h before the loader checked added tokens for valid UTF-8
SEED = int(os.environ.get("FUZZ_SEED", "7"))
CASES = int(os.environ.get("FUZZ_CASES", "300"))
OUT = os.path.join(TMP, "fuzz")
os.makedirs(OUT, exist_ok=True)
TIMEOUT_S = 60

BOUNDARY_BYTES = [0, 1, 0x7F, 0x80, 0xFE, 0xFF]
BOUNDARY_U32 = [0, 1, 2, 3, 4, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
# for tokenizer.bin's Unicode tables: the ends of Unicode, a surrogate, Hangul syllables and jamo, marks
CODE_POINTS = [0x20, 0x41, 0x300, 0x301, 0x10FFFF, 0x110000, 0xD800, 0xAC00, 0xAC01, 0xD7A3, 0xD7A4, 0x1100,
               0x1161, 0x11A7, 0x11A8]
# for the checkpoint's floats (rope_theta, rms_norm_eps, norm weights, k_scale), as their bits
FLOATS = [struct.unpack("<I", struct.pack("<f", x))[0]
          for x in (0.0, -0.0, math.nan, math.inf, -math.inf, 1e-30, 1e30, -1.0, 0.5, 3.0, 65504.0, 1e-45)]
# Text the tokenizer cases encode: every table in use (letters, numbers, spaces, contractions, marks that
# reorder and compose, decompositions, Hangul, added tokens)
BASE_TEXT = ("Hello, world! It's 2024: naïve café, Ångström ǅ ﬁ \u1E9B\u0323 a\u0328\u0301 e\u0301 "
             "\u1100\u1161\u11A8 한국어 你好 Привет ١٢ ½ 😀\t\n  x <|im_start|>user\nHi<|im_end|>\n")


def word_positions(start, end):
    return range(start + (-start % 4), end - 3, 4)


def mutate(rng, data, regions, values, counts=None):
    """One random mutation of data inside a region chosen from regions [(name, start, end)] ->
    (new data, what was done, the byte offset it touched). values: what a word may be set to, beside
    random bits; counts {region: (header offset of its row count, bytes per row)} lets a section be
    resized together with its count."""
    name, start, end = rng.choice(regions)
    end = min(end, len(data))  # an earlier mutation may have cut the file
    start = min(start, end)
    words = word_positions(start, end)
    kinds = ["bit", "byte", "word", "copy", "step", "swap", "cut", "extend"] + (["resize"] if counts else [])
    kind = rng.choice(kinds if words else ["bit", "byte", "cut", "extend"] if end > start else ["extend"])
    b = bytearray(data)
    if kind == "bit":
        at = rng.randrange(start, end)
        bit = rng.randrange(8)
        b[at] ^= 1 << bit
        return bytes(b), f"{name}: flip bit {bit} of byte {at}", at
    if kind == "byte":
        at, v = rng.randrange(start, end), rng.choice(BOUNDARY_BYTES)
        b[at] = v
        return bytes(b), f"{name}: byte {at} = {v:#x}", at
    if kind == "cut":
        at = rng.randrange(start, end + 1)
        return data[:at], f"{name}: cut at {at}", at
    if kind == "extend":
        n = rng.choice([1, 3, 4, 12, 256])
        return data + (bytes(n) if rng.random() < 0.5 else rng.randbytes(n)), f"extend by {n} bytes", len(data)
    at = rng.choice(words)
    old = struct.unpack_from("<I", data, at)[0]
    if kind == "word":
        v = rng.choice(values + [rng.getrandbits(32)])
    elif kind == "copy":
        v = struct.unpack_from("<I", data, rng.choice(words))[0]
    elif kind == "step":
        v = (old + rng.choice([-2, -1, 1, 2])) % 2**32
    elif kind == "swap":
        other = rng.choice(words)
        struct.pack_into("<I", b, at, struct.unpack_from("<I", data, other)[0])
        struct.pack_into("<I", b, other, old)
        return bytes(b), f"{name}: swap the words at {at} and {other}", at
    if kind != "resize":
        struct.pack_into("<I", b, at, v)
        return bytes(b), f"{name}: word {at} = {v:#x} (was {old:#x})", at
    if name not in counts:
        return mutate(rng, data, regions, values, counts)
    count_at, row_bytes = counts[name]
    n_rows = (end - start) // row_bytes
    rows = max(rng.choice([-2, -1, 1, 2]), -n_rows)
    struct.pack_into("<I", b, count_at, n_rows + rows)
    at = start + row_bytes * rng.randrange(0, n_rows + min(rows, 0) + 1)
    if rows > 0:  # new rows: copies of the ones before, or random
        before = data[at - rows * row_bytes:at] if at - rows * row_bytes >= start else b""
        b[at:at] = before if before and rng.random() < 0.5 else rng.randbytes(rows * row_bytes)
    else:
        del b[at:at - rows * row_bytes]
    return bytes(b), f"{name}: {rows:+d} rows at {at}, and its count", at


def mutated(rng, data, regions, values, counts=None):
    """1 to 3 mutations -> (data, [what was done], [offsets touched])."""
    done, touched = [], []
    for _ in range(rng.choice([1, 1, 2, 3])):
        data, what, at = mutate(rng, data, regions, values, counts)
        done.append(what)
        touched.append(at)
    return data, done, touched


def text_near(data, touched):
    """BASE_TEXT plus, for each word near a touched offset that is a Unicode scalar value, that character
    64 times, each with an acute accent (a mark that reorders and composes)."""
    extra = []
    for at in touched:
        for pos in word_positions(max(0, at - 12), min(len(data), at + 16)):
            c = struct.unpack_from("<I", data, pos)[0]
            if 0x20 <= c <= 0x10FFFF and not 0xD800 <= c <= 0xDFFF:
                extra.append((chr(c) + "\u0301") * 64)
    return BASE_TEXT + " ".join(extra)


def check_case(command, stdin, path, what):
    """None if the run worked or gave one clean error line, else why not (the file is kept)."""
    try:
        r = subprocess.run(command, input=stdin, capture_output=True, timeout=TIMEOUT_S,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        err = r.stderr.decode("utf-8", "replace")
        if r.returncode == 0 and "Sanitizer" not in err:
            return None
        assert_one_error_line(r.returncode, err, what)
        assert r.returncode == 1, f"{what}: exit {r.returncode}"
        return None
    except subprocess.TimeoutExpired:
        problem = f"{what}: no answer in {TIMEOUT_S} s"
    except AssertionError as e:
        problem = str(e)
    kept = os.path.join(OUT, f"failed_{what.replace(' ', '_')}{os.path.splitext(path)[1]}")
    shutil.copy(path, kept)
    return f"{problem}\n    file: {kept}"


def run_cases(kind, make_case):
    """Runs CASES cases of make_case(rng, i) -> (command, stdin, path, [what was done]); fails with every
    case that went wrong."""
    failures = []
    for i in range(CASES):
        command, stdin, path, done = make_case(random.Random(f"{SEED}/{kind}/{i}"), i)
        problem = check_case(command, stdin, path, f"seed {SEED} {kind} case {i}")
        if problem:
            failures.append(f"{problem}\n    mutations: {'; '.join(done)}")
    print(f"     {kind}: {CASES} cases from seed {SEED} (FUZZ_SEED, FUZZ_CASES), {len(failures)} failed")
    assert not failures, f"{len(failures)} of {CASES} {kind} cases failed:\n" + "\n".join(failures[:5])


def test_fuzz_tokenizer_loader():
    goods = {}
    for name in ("demo", "qwen3"):
        with open(TOKENIZERS[name][0], "rb") as f:
            data = f.read()
        _, at = sections(data)
        regions = [("header", 0, 4 * len(HEADER_FIELDS))] + \
                  [(s, start, start + 4 * rows * width) for s, (start, rows, width) in at.items() if rows] + \
                  [("end", len(data) - 64, len(data))]
        counts = {s: (4 * HEADER_FIELDS.index("n_" + s), 4 * width) for s, (_, _, width) in at.items()
                  if "n_" + s in HEADER_FIELDS and s != "piece_bytes"}  # n_piece_bytes counts bytes, not rows
        goods[name] = (data, regions, counts)
    sanitized = driver(sanitize=True)
    path = os.path.join(OUT, "tokenizer.bin")

    def make_case(rng, i):
        data, regions, counts = goods["qwen3" if i % 4 == 3 else "demo"]
        data, done, touched = mutated(rng, data, regions, BOUNDARY_U32 + CODE_POINTS, counts)
        with open(path, "wb") as f:
            f.write(data)
        text = text_near(data, touched).encode()
        if i % 4 == 1:
            return [RUNCPU, "-m", "tokenize", "-z", path, "-i", text.decode()], None, path, done
        return [sanitized, "encode", path], text, path, done

    run_cases("tokenizer", make_case)


def test_fuzz_checkpoint_loader():
    with open(export("qwen3_gqa2_bf16"), "rb") as f:
        good = f.read()
    regions = [("header", 0, 64)] * 2 + [("file", 0, len(good))]
    ids = write_ids([1, 2, 3], os.path.join(OUT, "ids.txt"))
    path = os.path.join(OUT, "model.bin")

    def make_case(rng, i):
        data, done, _ = mutated(rng, good, regions, BOUNDARY_U32 + FLOATS)
        with open(path, "wb") as f:
            f.write(data)
        return [RUNCPU, path, "-m", "logits", "-f", ids, "-n", "2"], None, path, done

    run_cases("checkpoint", make_case)
