"""Tests of tokenizer.h and export.py --tokenizer against Hugging Face tokenizers' ids.

tests/tokenizer_goldens.json holds HF's ids (made by tests/gen_tokenizer_goldens.js); the C driver
tests/test_tokenizer.c is built into build/ and run on them.
"""
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import unicodedata

from harness import ROOT as REPO, TOKENIZER as TOKENIZER_BIN, data_file

BUILD = os.path.join(REPO, "build")
TOKENIZER_JSON = data_file("qwen3-tokenizer/tokenizer.json")
GOLDENS = os.path.join(REPO, "tests", "tokenizer_goldens.json")
SHAKESPEARE = data_file("tinyshakespeare.txt")

_built = {}


def driver(sanitize=False):
    """Builds tests/test_tokenizer.c once per run; returns the binary's path."""
    name = "test_tokenizer_asan" if sanitize else "test_tokenizer"
    if name not in _built:
        os.makedirs(BUILD, exist_ok=True)
        out = os.path.join(BUILD, name)
        flags = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"] if sanitize else ["-O2"]
        r = subprocess.run(["gcc", *flags, "-Wall", "-Wextra", "-o", out, os.path.join(REPO, "tests", "test_tokenizer.c")],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"building {name} failed:\n{r.stderr}"
        assert "warning" not in r.stderr, f"building {name} gave warnings:\n{r.stderr}"
        _built[name] = out
    return _built[name]


def run(args, stdin=b"", sanitize=False):
    return subprocess.run([driver(sanitize), *args], input=stdin, capture_output=True)


def encode(text_bytes):
    r = run(["encode", TOKENIZER_BIN], stdin=text_bytes)
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


def check_cases(cases, name):
    path = os.path.join(BUILD, name + ".txt")
    os.makedirs(BUILD, exist_ok=True)
    write_cases(cases, path)
    r = run(["goldens", TOKENIZER_BIN, path])
    out = r.stdout.decode("utf-8", errors="replace")
    print(out.strip().splitlines()[-1] if out.strip() else r.stderr.decode(errors="replace"))
    assert r.returncode == 0, f"{name}: encodings differ from Hugging Face:\n{out}{r.stderr.decode(errors='replace')}"
    return out


def test_goldens_match():
    with open(GOLDENS, encoding="utf-8") as f:
        cases = json.load(f)
    assert len(cases) >= 1000, f"only {len(cases)} golden cases"
    out = check_cases(cases, "tokenizer_goldens")
    n_roundtrip = int(out.split(", ")[-1].split()[0])
    assert n_roundtrip >= 1000, f"only {n_roundtrip} of {len(cases)} cases had their round trip checked"


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


def test_reexport_identical():
    out = os.path.join(BUILD, "tokenizer_reexport.bin")
    os.makedirs(BUILD, exist_ok=True)
    r = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), "--tokenizer", TOKENIZER_JSON, out],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"export.py --tokenizer failed: {r.stderr}"
    with open(out, "rb") as a, open(TOKENIZER_BIN, "rb") as b:
        assert a.read() == b.read(), "re-exported tokenizer.bin differs from the committed one"


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


def test_corrupt_files_rejected():
    """Every damaged file gives one 'error:' line and exit 1, never a crash (checked under ASan/UBSan)."""
    corrupt = os.path.join(BUILD, "corrupt")
    shutil.rmtree(corrupt, ignore_errors=True)
    os.makedirs(corrupt)
    with open(TOKENIZER_BIN, "rb") as f:
        good = f.read()
    header = list(struct.unpack("<12I", good[:48]))

    def with_header(**changes):
        fields = ["magic", "version", "n_tokens", "n_merges", "n_added", "n_letters", "n_numbers", "n_spaces",
                  "n_ccc", "n_decomps", "n_compositions", "n_piece_bytes"]
        h = header[:]
        for k, v in changes.items():
            h[fields.index(k)] = v
        return struct.pack("<12I", *h) + good[48:]

    def patch_u32(offset, value):
        return good[:offset] + struct.pack("<I", value) + good[offset + 4:]

    n_tokens, n_merges, n_added, n_letters, n_numbers, n_spaces, n_ccc, n_decomps = header[2:10]
    merges_at = 48 + 4 * (n_tokens + 1) + (header[11] + 3) // 4 * 4
    letters_at = merges_at + 8 * (n_merges + n_added)
    ccc_at = letters_at + 8 * (n_letters + n_numbers + n_spaces)
    decomps_at = ccc_at + 12 * n_ccc
    compositions_at = decomps_at + 12 * n_decomps
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
        at = rng.randrange(0, len(good) - 4) // 4 * 4
        files[f"random_{i}_at_{at}"] = patch_u32(at, rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)]))
    for cut in (3, 47, 48, 100, 4 * n_tokens, len(good) // 2, merges_at + 1, len(good) - 4000, len(good) - 1):
        files[f"truncated_{cut}"] = good[:cut]
    paths = {}
    for name, data in files.items():
        paths[name] = os.path.join(corrupt, name + ".bin")
        with open(paths[name], "wb") as f:
            f.write(data)
    paths["directory"] = corrupt
    paths["missing"] = os.path.join(corrupt, "no_such_file.bin")
    for name, path in paths.items():
        r = run(["load", path], sanitize=True)
        err = r.stderr.decode(errors="replace")
        lines = err.splitlines()
        if name.startswith("random") and r.returncode == 0 and not err:
            continue
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: tokenizer "), \
            f"{name}: exit {r.returncode}, stderr:\n{err}"
    assert run(["load", TOKENIZER_BIN], sanitize=True).returncode == 0, "the good tokenizer.bin fails to load under ASan"


def test_sanitizers_clean_on_goldens():
    with open(GOLDENS, encoding="utf-8") as f:
        cases = json.load(f)
    path = os.path.join(BUILD, "tokenizer_goldens_asan.txt")
    write_cases(cases[::4], path)
    r = run(["goldens", TOKENIZER_BIN, path], sanitize=True)
    assert r.returncode == 0, f"goldens under ASan/UBSan failed:\n{r.stdout.decode(errors='replace')}{r.stderr.decode(errors='replace')}"


def test_live_fuzz_against_hf():
    """A few hundred fresh random strings, encoded live by HF. CI installs npm tokenizers, so there
    a missing package fails; elsewhere the test says it did not run."""
    if not shutil.which("node") or not os.path.isdir(os.path.join(REPO, "node_modules", "tokenizers")):
        assert not os.environ.get("CI"), "CI must have node_modules/tokenizers (npm install tokenizers)"
        print("not run: node or node_modules/tokenizers missing (npm install tokenizers)")
        return
    seed = int(time.time()) % 1_000_000
    out = os.path.join(BUILD, "tokenizer_fuzz.json")
    os.makedirs(BUILD, exist_ok=True)
    r = subprocess.run(["node", os.path.join(REPO, "tests", "gen_tokenizer_goldens.js"), "--fuzz", str(seed), "300", out],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"node fuzz generator failed:\n{r.stderr}"
    with open(out, encoding="utf-8") as f:
        cases = json.load(f)
    print(f"fuzz seed {seed} (rerun: node tests/gen_tokenizer_goldens.js --fuzz {seed} 300 OUT.json)")
    check_cases(cases, "tokenizer_fuzz")
