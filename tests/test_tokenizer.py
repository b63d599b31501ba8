"""Tests of tokenizer.h and export.py --tokenizer against Hugging Face tokenizers' ids, for both tokenizers
the repo ships: Qwen3's (tokenizer.bin) and the demo model's (demo/tokenizer.bin, 4096 ids).

tests/tokenizer_goldens.json and tests/demo_tokenizer_goldens.json hold HF's ids (made by
tests/gen_tokenizer_goldens.js); the C driver tests/test_tokenizer.c is built into build/ and run on them.
"""
import json
import lzma
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import unicodedata

import gen_unicode_tables
import harness
from harness import ROOT as REPO, RUNCPU, TOKENIZER as TOKENIZER_BIN, Skip, assert_one_error_line, data_file

BUILD = os.path.join(REPO, "build")
SHAKESPEARE = data_file("tinyshakespeare.txt")
# name -> (tokenizer.bin, the tokenizer.json it is exported from, HF's goldens for it)
TOKENIZERS = {
    "qwen3": (TOKENIZER_BIN, data_file("qwen3-tokenizer/tokenizer.json"),
              os.path.join(REPO, "tests", "tokenizer_goldens.json")),
    "demo": (os.path.join(REPO, "demo", "tokenizer.bin"), os.path.join(REPO, "demo", "tokenizer.json"),
             os.path.join(REPO, "tests", "demo_tokenizer_goldens.json")),
}
HEADER_FIELDS = ["magic", "version", "n_tokens", "n_merges", "n_added", "n_letters", "n_numbers", "n_spaces",
                 "n_ccc", "n_decomps", "n_compositions", "n_piece_bytes"]


def sections(data):
    """A tokenizer.bin's header and sections as export.py lays them out:
    ({field: value}, {section: (byte offset, rows, uint32 words per row)})."""
    h = dict(zip(HEADER_FIELDS, struct.unpack_from("<12I", data)))
    rows = [("piece_offsets", h["n_tokens"] + 1, 1), ("piece_bytes", (h["n_piece_bytes"] + 3) // 4, 1),
            ("merges", h["n_merges"], 2), ("added", h["n_added"], 2), ("letters", h["n_letters"], 2),
            ("numbers", h["n_numbers"], 2), ("spaces", h["n_spaces"], 2), ("ccc", h["n_ccc"], 3),
            ("decomps", h["n_decomps"], 3), ("compositions", h["n_compositions"], 3)]
    at, out = 4 * len(HEADER_FIELDS), {}
    for name, n, width in rows:
        out[name] = (at, n, width)
        at += 4 * n * width
    assert at == len(data), f"tokenizer.bin of {len(data)} bytes, its header's counts say {at}"
    return h, out


def driver(sanitize=False):
    """Builds tests/test_tokenizer.c into build/ when the binary is older than its sources, as make would
    (test_fuzz.py uses it too); returns the binary's path."""
    name = "test_tokenizer_asan" if sanitize else "test_tokenizer"
    out = os.path.join(BUILD, name)
    sources = [os.path.join(REPO, f) for f in ("tests/test_tokenizer.c", "tests/test_tokenizer.py", "tokenizer.h")]
    if os.path.exists(out) and os.path.getmtime(out) > max(map(os.path.getmtime, sources)):
        return out
    os.makedirs(BUILD, exist_ok=True)
    flags = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"] if sanitize else ["-O2"]
    r = subprocess.run(["gcc", *flags, "-Wall", "-Wextra", "-o", out + ".part", sources[0]], capture_output=True, text=True)
    assert r.returncode == 0, f"building {name} failed:\n{r.stderr}"
    assert "warning" not in r.stderr, f"building {name} gave warnings:\n{r.stderr}"
    os.replace(out + ".part", out)
    return out


def run(args, stdin=b"", sanitize=False):
    return subprocess.run([driver(sanitize), *args], input=stdin, capture_output=True)


def encode(text_bytes, tokenizer_bin=TOKENIZER_BIN):
    r = run(["encode", tokenizer_bin], stdin=text_bytes)
    assert r.returncode == 0, f"encode failed: {r.stderr.decode(errors='replace')}"
    out = r.stdout.decode().strip()
    if out.startswith("invalid"):
        return out
    return [int(x) for x in out.split()]


def roundtrip_expected(text):
    # decoding gives the input back unless NFC changed it
    return unicodedata.is_normalized("NFC", text)


def write_cases(cases, path):
    """Goldens -> the driver's line format: FLAG HEX N ID..."""
    with open(path, "w") as f:
        for case in cases:
            hex_text = case["text"].encode("utf-8").hex() or "-"
            flag = "R" if roundtrip_expected(case["text"]) else "-"
            f.write(f"{flag} {hex_text} {len(case['ids'])} {' '.join(map(str, case['ids']))}\n")


def check_cases(cases, name, tokenizer_bin, sanitize=False):
    path = os.path.join(BUILD, name + ".txt")
    os.makedirs(BUILD, exist_ok=True)
    write_cases(cases, path)
    r = run(["goldens", tokenizer_bin, path], sanitize=sanitize)
    out = r.stdout.decode("utf-8", errors="replace")
    print(f"     {name}: " + (out.strip().splitlines()[-1] if out.strip() else r.stderr.decode(errors="replace")))
    assert r.returncode == 0, f"{name}: encodings differ from Hugging Face:\n{out}{r.stderr.decode(errors='replace')}"
    return out


def goldens(name):
    with open(TOKENIZERS[name][2], encoding="utf-8") as f:
        return json.load(f)


def test_goldens_match():
    for name, (tokenizer_bin, _, _) in TOKENIZERS.items():
        cases = goldens(name)
        assert len(cases) >= 1000, f"{name}: only {len(cases)} golden cases"
        out = check_cases(cases, f"{name}_goldens", tokenizer_bin)
        n_roundtrip = int(out.split(", ")[-1].split()[0])
        assert n_roundtrip >= 1000, f"{name}: only {n_roundtrip} of {len(cases)} cases had their round trip checked"


def test_facts_ground_truth():
    chat = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for text, want in [("Hello world", [9707, 1879]), (" Hello world", [21927, 1879]),
                       (chat, [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]),
                       ("", [])]:
        got = encode(text.encode())
        assert got == want, f"{text!r}: got {got}, FACTS.md says {want}"
    info = run(["info", TOKENIZER_BIN]).stdout.decode().splitlines()
    want_info = ["vocab_size 151669", "find 151644", "find 151645", "find 151643", "find 151667", "find 9707",
                 "find 21927", "find 198", "find -1", "piece -1 0 ok", "piece 0 1 ok", "piece 198 1 ok",
                 "piece 151645 10 ok", "piece 151668 8 ok", "piece 151669 0 ok", "piece 151935 0 ok",
                 "piece 1073741824 0 ok"]
    assert info == want_info, f"vocab size / find / piece lookups differ:\n{info}\nexpected\n{want_info}"


def test_reexport_identical_whatever_python():
    """export.py --tokenizer gives the committed files byte for byte, run with the standard library's
    unicodedata removed: its Unicode tables come from data/unicode_tables.json.xz, so the output cannot
    depend on the Unicode version of the Python that runs it (3.10 to 3.13 carry 13.0 to 15.1)."""
    os.makedirs(BUILD, exist_ok=True)
    without_unicodedata = ("import runpy, sys; sys.modules['unicodedata'] = None; sys.argv = sys.argv[1:]; "
                           "runpy.run_path(sys.argv[0], run_name='__main__')")
    for name, (tokenizer_bin, tokenizer_json, _) in TOKENIZERS.items():
        out = os.path.join(BUILD, f"{name}_tokenizer_reexport.bin")
        r = subprocess.run([sys.executable, "-c", without_unicodedata, os.path.join(REPO, "export.py"), "--tokenizer",
                            tokenizer_json, out], capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: export.py --tokenizer without unicodedata failed: {r.stderr}"
        with open(out, "rb") as a, open(tokenizer_bin, "rb") as b:
            assert a.read() == b.read(), f"{name}: re-exported {tokenizer_bin} differs from the committed one"


def test_unicode_tables_reproducible():
    """data/unicode_tables.json.xz is what tests/gen_unicode_tables.py builds (it needs Python 3.11's
    unicodedata 14.0.0, which CI has)."""
    if unicodedata.unidata_version != "14.0.0":
        raise Skip(f"gen_unicode_tables.py needs unicodedata 14.0.0 (Python 3.11), this is {unicodedata.unidata_version}")
    with lzma.open(os.path.join(REPO, "data", "unicode_tables.json.xz")) as f:
        committed = json.load(f)
    assert committed == gen_unicode_tables.unicode_tables(), "data/unicode_tables.json.xz is not what gen_unicode_tables.py builds"


def test_encode_speed():
    r = run(["speed", TOKENIZER_BIN, SHAKESPEARE])
    out = r.stdout.decode().strip()
    print(out)
    assert r.returncode == 0, out + r.stderr.decode()
    seconds = float(out.split(" in ")[1].split()[0])
    assert seconds < 0.5, f"encoding tinyshakespeare took {seconds:.3f} s, the target is < 0.5 s"
    # one long piece must not be quadratic
    long_piece = os.path.join(BUILD, "long_piece.txt")
    with open(long_piece, "w") as f:
        f.write("a" * 100_000)
    out = run(["speed", TOKENIZER_BIN, long_piece]).stdout.decode().strip()
    print(out)
    seconds = float(out.split(" in ")[1].split()[0])
    assert seconds < 0.1, f"encoding 100 KB of 'a' took {seconds:.3f} s"


def test_invalid_utf8_rejected():
    cases = [b"\xff", b"abc\x80", b"ok \xc3", b"\xc3\x28", b"\xe2\x82", b"x\xe2\x82\x28", b"\xed\xa0\x80",
             b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x8f\xbf\xbf", b"hello \xf8\x88\x80\x80\x80",
             "é✓😀".encode() + b"\xf0\x9f\x98", "<|im_end|>".encode() + b"\xfe"]
    for text in cases:
        try:
            text.decode("utf-8")
            raise AssertionError(f"test input {text!r} is valid UTF-8")
        except UnicodeDecodeError as e:
            want = f"invalid UTF-8 at {e.start}"
        got = encode(text)
        assert got == want, f"{text!r}: got {got!r}, expected {want!r}"


def test_decode_round_trip_and_streaming():
    texts = ["Hello world", "你好，世界！😀👨‍👩‍👧‍👦 🇯🇵", "Привет नमस्ते สวัสดี <think>\n</think>", "e\u0301 → é",
             open(SHAKESPEARE, encoding="utf-8").read()[:20000]]
    for text in texts:
        ids = encode(text.encode())
        r = run(["decode", TOKENIZER_BIN], stdin=" ".join(map(str, ids)).encode())
        assert r.returncode == 0, f"streaming decode of {text[:40]!r} emitted broken UTF-8: {r.stderr.decode()}"
        assert r.stdout == unicodedata.normalize("NFC", text).encode(), f"decode of {text[:40]!r} gives {r.stdout[:80]!r}"
    # any bytes, in chunks of 1..7: the output is always valid and ends as Python's "replace" decoding
    rng = random.Random(7)
    samples = [b"\xe4\xbd\xa0\xe5\xa5\xbd", b"\xf0\x9f\x98\x80", b"\xe2\x82", b"\xe2\x82A", b"\xf0\x80\x80", b"\xed\xa0\x80",
               b"\xc3", b"\xff\xfe", b"\xf4\x90\x80\x80", b"ok\xc3\xa9\xc3"]
    samples += [bytes(rng.choice([0x41, 0x80, 0xbf, 0xc2, 0xc3, 0xe0, 0xe2, 0xed, 0xf0, 0xf4, 0xf5, 0xff, 0x9f, 0xa0])
                      for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for data in samples:
        for chunk in (1, 3, 7):
            r = run(["stream", str(chunk)], stdin=data)
            assert r.returncode == 0, f"stream of {data!r} (chunks up to {chunk}) emitted broken UTF-8"
            want = data.decode("utf-8", errors="replace").encode()
            assert r.stdout == want, f"stream of {data!r}: got {r.stdout!r}, expected {want!r}"


def corrupt_file(name, data):
    path = os.path.join(BUILD, "corrupt", name + ".bin")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_corrupt_files_rejected():
    """Every damaged file gives one 'error:' line and exit 1, never a crash (checked under ASan/UBSan)."""
    shutil.rmtree(os.path.join(BUILD, "corrupt"), ignore_errors=True)
    with open(TOKENIZER_BIN, "rb") as f:
        good = f.read()
    header, at = sections(good)

    def with_header(**changes):
        h = [changes.get(k, header[k]) for k in HEADER_FIELDS]
        return struct.pack("<12I", *h) + good[48:]

    def patch_u32(offset, value):
        return good[:offset] + struct.pack("<I", value) + good[offset + 4:]

    merges_at, letters_at, ccc_at = at["merges"][0], at["letters"][0], at["ccc"][0]
    decomps_at, compositions_at = at["decomps"][0], at["compositions"][0]
    files = {
        "empty": b"", "magic_only": b"QTOK", "wrong_magic": b"GGUF" + good[4:], "wrong_version": with_header(version=2),
        "huge_tokens": with_header(n_tokens=0xFFFFFFFF), "huge_merges": with_header(n_merges=0xFFFFFFF0),
        "huge_letters": with_header(n_letters=0x7FFFFFFF), "huge_piece_bytes": with_header(n_piece_bytes=0xFFFFFFFF),
        "zero_tokens": with_header(n_tokens=0), "few_tokens": with_header(n_tokens=300),
        "bad_piece_offset": patch_u32(48 + 4 * 1000, 0xFFFFFF00), "bad_merge": patch_u32(merges_at, 5),
        "merge_out_of_range": patch_u32(merges_at + 4, 0xFFFFFFFF), "trailing_byte": good + b"\0",
        "letters_unsorted": patch_u32(letters_at + 8, 0), "letter_past_unicode": patch_u32(letters_at + 4, 0x110000),
        "ccc_zero": patch_u32(ccc_at + 8, 0), "decomp_cycle": patch_u32(decomps_at + 4, struct.unpack_from("<I", good, decomps_at)[0]),
        "compositions_unsorted": patch_u32(compositions_at + 12, 0),
    }
    rng = random.Random(1)
    for i in range(40):  # random damage: may load (e.g. a changed letter range), must never crash
        pos = rng.randrange(0, len(good) - 4) // 4 * 4
        files[f"random_{i}_at_{pos}"] = patch_u32(pos, rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)]))
    for cut in (3, 47, 48, 100, 4 * header["n_tokens"], len(good) // 2, merges_at + 1, len(good) - 4000, len(good) - 1):
        files[f"truncated_{cut}"] = good[:cut]
    paths = {name: corrupt_file(name, data) for name, data in files.items()}
    paths["directory"] = os.path.join(BUILD, "corrupt")
    paths["missing"] = os.path.join(BUILD, "corrupt", "no_such_file.bin")
    paths["not_a_regular_file"] = "/dev/zero"  # was read until memory ran out
    for name, path in paths.items():
        r = run(["load", path], sanitize=True)
        err = r.stderr.decode(errors="replace")
        lines = err.splitlines()
        if name.startswith("random") and r.returncode == 0 and not err:
            continue
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: tokenizer "), \
            f"{name}: exit {r.returncode}, stderr:\n{err}"
    assert run(["load", TOKENIZER_BIN], sanitize=True).returncode == 0, "the good tokenizer.bin fails to load under ASan"


def with_decomposition(good, code_point, first, second):
    """good (a tokenizer.bin) with code_point's decomposition replaced by (first, second)."""
    at, n, _ = sections(good)[1]["decomps"]
    for i in range(n):
        if struct.unpack_from("<I", good, at + 12 * i)[0] == code_point:
            return good[:at + 12 * i + 4] + struct.pack("<2I", first, second) + good[at + 12 * i + 12:]
    raise AssertionError(f"U+{code_point:04X} has no decomposition")


def test_crafted_decompositions():
    """A decomposition into a Hangul syllable (2-3 jamo once decomposed) made NFC write past its buffer,
    sized as if the syllable were one code point (issue 12); one longer or deeper than any in Unicode
    (4 code points, 3 levels) is refused at load."""
    demo_bin = TOKENIZERS["demo"][0]
    with open(demo_bin, "rb") as f:
        good = f.read()
    # U+00C0 = A + grave -> U+AC01 (3 jamo) + grave: each of 100 such characters decomposes to 4 code points
    into_hangul = corrupt_file("decomposition_into_hangul", with_decomposition(good, 0xC0, 0xAC01, 0x300))
    text = "\u00C0" * 100
    r = run(["encode", into_hangul], stdin=text.encode(), sanitize=True)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0 and not err, f"encoding with a decomposition into a Hangul syllable: exit {r.returncode}\n{err}"
    # NFC recomposes the jamo into U+AC01, the grave does not join it: the text is U+AC01 U+0300, 100 times
    want = encode("\uAC01\u0300".encode() * 100, demo_bin)
    assert [int(x) for x in r.stdout.split()] == want, "the crafted decomposition was not applied as NFC would"
    rc, out, err = harness.run([RUNCPU, "-m", "tokenize", "-z", into_hangul, "-i", text])
    assert rc == 0 and [int(x) for x in out.split()] == want, f"runcpu -m tokenize: exit {rc}, {err[-500:]}"

    for name, first, second in [("too_long", 0x1F82, 0x300), ("too_deep", 0x1F82, 0)]:
        path = corrupt_file(f"decomposition_{name}", with_decomposition(good, 0xC0, first, second))
        r = run(["load", path], sanitize=True)
        assert_one_error_line(r.returncode, r.stderr.decode(errors="replace"), f"decomposition {name}")


def test_added_token_not_utf8_rejected():
    """An added token whose text is not valid UTF-8 (here the single byte 0xAD) matched inside a character
    (U+00AD is C2 AD) and left a broken sequence in the stretch before it, which the encoder decoded past
    its buffer (found by test_fuzz.py). The loader refuses it."""
    with open(TOKENIZERS["demo"][0], "rb") as f:
        good = f.read()
    _, at = sections(good)
    offsets = struct.unpack_from("<257I", good, at["piece_offsets"][0])
    pieces = [good[at["piece_bytes"][0] + offsets[i]:at["piece_bytes"][0] + offsets[i + 1]] for i in range(256)]
    added_at, n_added, _ = at["added"]
    # the last added token (<|im_end|>) becomes the byte 0xAD's id
    bad = good[:added_at + 8 * (n_added - 1)] + struct.pack("<I", pieces.index(b"\xad")) + good[added_at + 8 * n_added - 4:]
    r = run(["encode", corrupt_file("added_token_not_utf8", bad)], stdin="a\u00ad b".encode(), sanitize=True)
    assert_one_error_line(r.returncode, r.stderr.decode(errors="replace"), "added token not UTF-8")


def test_sanitizers_clean_on_goldens():
    for name, (tokenizer_bin, _, _) in TOKENIZERS.items():
        check_cases(goldens(name)[::4], f"{name}_goldens_asan", tokenizer_bin, sanitize=True)


def test_live_fuzz_against_hf():
    """A few hundred fresh random strings per tokenizer, encoded live by HF (npm tokenizers, which CI
    installs: a skip fails there)."""
    if not shutil.which("node") or not os.path.isdir(os.path.join(REPO, "node_modules", "tokenizers")):
        raise Skip("node or node_modules/tokenizers missing (npm install tokenizers)")
    seed = int(time.time()) % 1_000_000
    os.makedirs(BUILD, exist_ok=True)
    for name, (tokenizer_bin, tokenizer_json, _) in TOKENIZERS.items():
        out = os.path.join(BUILD, f"{name}_tokenizer_fuzz.json")
        r = subprocess.run(["node", os.path.join(REPO, "tests", "gen_tokenizer_goldens.js"), "--fuzz", str(seed), "300",
                            tokenizer_json, out], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, f"node fuzz generator failed:\n{r.stderr}"
        with open(out, encoding="utf-8") as f:
            cases = json.load(f)
        print(f"     {name}: fuzz seed {seed} (rerun: node tests/gen_tokenizer_goldens.js --fuzz {seed} 300 "
              f"{os.path.relpath(tokenizer_json, REPO)} OUT.json)")
        check_cases(cases, f"{name}_tokenizer_fuzz", tokenizer_bin)
