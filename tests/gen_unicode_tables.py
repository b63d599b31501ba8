"""Builds data/unicode_tables.json.xz: the Unicode tables that tokenizer.bin carries (what HF tokenizers'
Qwen2 pre-tokenizer regex calls letters, numbers and white space; what its NFC normalizer needs), so that
export.py writes the same bytes whichever Python runs it. Run once, with Python 3.11 (unicodedata 14.0.0):
    python3 tests/gen_unicode_tables.py data/unicode_tables.json.xz
test_tokenizer.py regenerates the tables and compares them with the committed file when it runs on 3.11.

Unicode versions: Hugging Face tokenizers does not use one Unicode version throughout. Its regex engine
classes letters and numbers by Unicode 16.0, its NFC (the unicode-normalization-alignments crate) uses
Unicode 9.0 data. The tables start from Python 3.11's unicodedata (14.0.0) and are adjusted to those
versions by the lists below, which were found by running every code point through the tokenizers 0.23.2
pre-tokenizer and normalizer.

The file is JSON: {"unicode_source": ..., "letters": [[first, last], ...], "numbers": ..., "spaces": ...,
"ccc": [[first, last, class], ...], "decomps": [[code point, first, second or 0], ...],
"compositions": [[first, second, composite], ...]}, each table in the order and form tokenizer.bin's
sections have (export.py describes them).
"""
import json
import lzma
import sys
import unicodedata

UNIDATA_VERSION = "14.0.0"

# Letters and numbers added in Unicode 15.0-16.0 (unassigned in 14.0), which HF's regex matches.
LETTERS_AFTER_UNICODE_14 = [
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389), (0x1138B, 0x1138B),
    (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3),
    (0x11BC0, 0x11BE0), (0x11F02, 0x11F02), (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F),
    (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D), (0x1E4D0, 0x1E4EB),
    (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739), (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
]
NUMBERS_AFTER_UNICODE_14 = [
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59), (0x16130, 0x16139),
    (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
]
# Characters whose combining class or decomposition came after Unicode 9.0: HF's NFC treats them as
# plain starters with no decomposition.
NFC_DATA_AFTER_UNICODE_9 = [
    (0x7FD, 0x7FD), (0x898, 0x89F), (0x8CA, 0x8D3), (0x9FE, 0x9FE), (0xC3C, 0xC3C), (0xD3B, 0xD3C),
    (0xEBA, 0xEBA), (0x1715, 0x1715), (0x1ABF, 0x1ACE), (0x1DF6, 0x1DFA), (0xA82C, 0xA82C),
    (0x10D24, 0x10D27), (0x10EAB, 0x10EAC), (0x10F46, 0x10F50), (0x10F82, 0x10F85), (0x11070, 0x11070),
    (0x1133B, 0x1133B), (0x1145E, 0x1145E), (0x11839, 0x1183A), (0x11938, 0x11938), (0x1193D, 0x1193E),
    (0x11943, 0x11943), (0x119E0, 0x119E0), (0x11A34, 0x11A34), (0x11A47, 0x11A47), (0x11A99, 0x11A99),
    (0x11D42, 0x11D42), (0x11D44, 0x11D45), (0x11D97, 0x11D97), (0x16FF0, 0x16FF1), (0x1E130, 0x1E136),
    (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF),
]
# PropList.txt White_Space (unchanged since Unicode 6.3); unicodedata does not expose it.
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


def range_set(ranges):
    return {cp for lo, hi in ranges for cp in range(lo, hi + 1)}


def to_ranges(code_points, value=lambda cp: None):
    """Sorted code points -> [[first, last]] or, when value gives one, [[first, last, value]]."""
    ranges = []
    for cp in code_points:
        v = value(cp)
        if ranges and ranges[-1][1] == cp - 1 and ranges[-1][2] == v:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp, v])
    return [[lo, hi] if v is None else [lo, hi, v] for lo, hi, v in ranges]


def unicode_tables():
    if unicodedata.unidata_version != UNIDATA_VERSION:
        sys.exit(f"error: gen_unicode_tables.py needs Python's unicodedata {UNIDATA_VERSION} (Python 3.11), "
                 f"this one is {unicodedata.unidata_version}: the corrections below are relative to it")
    all_cps = range(0x110000)
    category = [unicodedata.category(chr(cp))[0] for cp in all_cps]
    new_letters, new_numbers = range_set(LETTERS_AFTER_UNICODE_14), range_set(NUMBERS_AFTER_UNICODE_14)
    letters = to_ranges([cp for cp in all_cps if category[cp] == "L" or cp in new_letters])
    numbers = to_ranges([cp for cp in all_cps if category[cp] == "N" or cp in new_numbers])

    no_nfc_data = range_set(NFC_DATA_AFTER_UNICODE_9)
    nfc_cps = [cp for cp in all_cps if cp not in no_nfc_data]
    ccc = to_ranges([cp for cp in nfc_cps if unicodedata.combining(chr(cp))],
                    lambda cp: unicodedata.combining(chr(cp)))
    decomps, compositions = [], []
    for cp in nfc_cps:
        d = unicodedata.decomposition(chr(cp))
        if not d or d.startswith("<") or 0xAC00 <= cp <= 0xD7A3:  # Hangul syllables are computed
            continue
        parts = [int(x, 16) for x in d.split()]
        assert len(parts) in (1, 2), f"U+{cp:04X}: canonical decomposition of {len(parts)} code points"
        first, second = parts[0], parts[1] if len(parts) == 2 else 0
        decomps.append([cp, first, second])
        # a primary composite is one that NFC rebuilds; composition exclusions never come back
        if second and unicodedata.normalize("NFC", chr(first) + chr(second)) == chr(cp):
            compositions.append([first, second, cp])
    compositions.sort()
    return {"unicode_source": f"Python unicodedata {UNIDATA_VERSION} adjusted to HF tokenizers 0.23.2 "
                              "(regex: Unicode 16.0, NFC: Unicode 9.0) by tests/gen_unicode_tables.py",
            "letters": letters, "numbers": numbers, "spaces": [list(r) for r in WHITE_SPACE], "ccc": ccc,
            "decomps": decomps, "compositions": compositions}


def encoded(tables):
    """The file's bytes: one table per line, xz-compressed (deterministic for the same tables)."""
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in tables.items())
    return lzma.compress(("{\n" + lines + "\n}\n").encode(), preset=9 | lzma.PRESET_EXTREME)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/gen_unicode_tables.py data/unicode_tables.json.xz")
    with open(sys.argv[1], "wb") as f:
        f.write(encoded(unicode_tables()))
