"""Exports a Hugging Face byte-level BPE tokenizer.json (Qwen2/Qwen3) to tokenizer.bin for tokenizer.h.

    python3 export_tokenizer.py ../shared/qwen3-tokenizer/tokenizer.json tokenizer.bin

Binary layout, all integers little-endian uint32, sections back to back in this order:

    field                       count                what
    magic                       4 bytes              b"QTOK"
    version                     1                    1
    n_tokens                    1                    ids 0..n_tokens-1 all have text (vocab + added tokens)
    n_merges                    1                    merge rank r joins merges[r] into id 256 + r
    n_added                     1                    added tokens
    n_letters, n_numbers,       1 each               range counts of the Unicode tables below
      n_spaces, n_ccc,
      n_decomps, n_compositions
    n_piece_bytes               1                    size of piece_bytes
    piece_offsets               n_tokens + 1         token i is piece_bytes[offsets[i] : offsets[i+1]]
    piece_bytes                 n_piece_bytes bytes  raw token bytes (ByteLevel undone), zero-padded to 4
    merges                      n_merges x 2         (left id, right id)
    added                       n_added x 2          (id, flags): flags bit 0 = special
    letters                     n_letters x 2        (first, last) code points of \\p{L}, sorted, disjoint
    numbers                     n_numbers x 2        (first, last) of \\p{N}
    spaces                      n_spaces x 2         (first, last) of White_Space (the regex's \\s)
    ccc                         n_ccc x 3            (first, last, canonical combining class), nonzero only
    decomps                     n_decomps x 3        (code point, first, second or 0): canonical, one level,
                                                     sorted by code point (Hangul syllables are computed)
    compositions                n_compositions x 3   (first, second, composite) sorted by (first, second):
                                                     primary composites, composition exclusions removed

Unicode versions: Hugging Face tokenizers does not use one Unicode version throughout. Its regex engine
classes letters and numbers by Unicode 16.0, its NFC (the unicode-normalization-alignments crate) uses
Unicode 9.0 data. The tables start from Python's unicodedata (14.0.0 in Python 3.11, required here so
the file is reproducible) and are adjusted to those versions by the two lists below, which were found
by running every code point through the tokenizers 0.23.2 pre-tokenizer and normalizer.
"""
import json
import struct
import sys
import unicodedata

MAGIC = b"QTOK"
VERSION = 1
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
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# PropList.txt White_Space (unchanged since Unicode 6.3); unicodedata does not expose it.
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


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


def range_set(ranges):
    return {cp for lo, hi in ranges for cp in range(lo, hi + 1)}


def to_ranges(code_points, value=lambda cp: None):
    """Sorted code points -> [(first, last)] or, when value gives one, [(first, last, value)]."""
    ranges = []
    for cp in code_points:
        v = value(cp)
        if ranges and ranges[-1][1] == cp - 1 and ranges[-1][2] == v:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp, v])
    return [(lo, hi) if v is None else (lo, hi, v) for lo, hi, v in ranges]


def unicode_tables():
    if unicodedata.unidata_version != UNIDATA_VERSION:
        raise SystemExit(f"error: export_tokenizer needs Python's unicodedata {UNIDATA_VERSION} (Python 3.11), "
                         f"this one is {unicodedata.unidata_version}: the tables would not match HF's")
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
        if not d or d.startswith("<") or 0xAC00 <= cp <= 0xD7A3:
            continue
        parts = [int(x, 16) for x in d.split()]
        if len(parts) not in (1, 2):
            raise SystemExit(f"error: U+{cp:04X}: canonical decomposition of {len(parts)} code points")
        first, second = parts[0], parts[1] if len(parts) == 2 else 0
        decomps.append((cp, first, second))
        # a primary composite is one that NFC rebuilds; composition exclusions never come back
        if second and unicodedata.normalize("NFC", chr(first) + chr(second)) == chr(cp):
            compositions.append((first, second, cp))
    compositions.sort()
    return letters, numbers, WHITE_SPACE, ccc, decomps, compositions


def load_tokenizer_json(path):
    """-> (list of token bytes indexed by id, merges as id pairs, [(id, special)]), checking the BPE facts."""
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    # tokenizer.h hard-codes this pipeline: refuse any other rather than export something that encodes wrongly
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if tok["normalizer"] != {"type": "NFC"} or \
            tok["pre_tokenizer"] != {"type": "Sequence", "pretokenizers": [split, byte_level]}:
        raise SystemExit(f"error: {path}: not the Qwen2/Qwen3 normalizer and pre-tokenizer (NFC, Split, ByteLevel)")
    model = tok["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise SystemExit(f"error: {path}: not a plain byte-level BPE model")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = model["vocab"]
    pieces = [None] * len(vocab)
    for text, i in vocab.items():
        if not 0 <= i < len(vocab) or pieces[i] is not None:
            raise SystemExit(f"error: {path}: vocab ids are not 0..{len(vocab) - 1}, each once (id {i})")
        pieces[i] = bytes(byte_of[c] for c in text)
    if sorted(pieces[:256]) != [bytes([b]) for b in range(256)]:
        raise SystemExit(f"error: {path}: ids 0..255 are not the 256 bytes")

    merges = []
    for rank, m in enumerate(model["merges"]):
        left, right = m.split(" ") if isinstance(m, str) else m
        want = 256 + rank
        if vocab.get(left + right) != want:
            raise SystemExit(f"error: {path}: merge rank {rank} ({left!r} {right!r}) gives id "
                             f"{vocab.get(left + right)}, expected {want}: tokenizer.h assumes id = 256 + rank")
        merges.append((vocab[left], vocab[right]))
    if 256 + len(merges) != len(vocab):
        raise SystemExit(f"error: {path}: {len(vocab)} vocab entries but {len(merges)} merges: "
                         f"ids >= 256 must each come from one merge")

    added = []
    for a in sorted(tok["added_tokens"], key=lambda a: a["id"]):
        if a["id"] != len(pieces):
            raise SystemExit(f"error: {path}: added token {a['content']!r} has id {a['id']}, "
                             f"expected {len(pieces)} (ids must follow the vocab without gaps)")
        if a["normalized"] or a["lstrip"] or a["rstrip"] or a["single_word"]:
            raise SystemExit(f"error: {path}: added token {a['content']!r} has options tokenizer.h lacks")
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

    header = MAGIC + u32s([VERSION, len(pieces), len(merges), len(added), len(letters), len(numbers),
                           len(spaces), len(ccc), len(decomps), len(compositions), len(piece_bytes)])
    body = [u32s(offsets), piece_bytes + padding, u32s(merges), u32s(added), u32s(letters), u32s(numbers),
            u32s(spaces), u32s(ccc), u32s(decomps), u32s(compositions)]
    with open(out_path, "wb") as f:
        f.write(header + b"".join(body))
    print(f"wrote {out_path}: {len(pieces)} tokens, {len(merges)} merges, {len(added)} added, "
          f"unicode tables {len(letters)}/{len(numbers)}/{len(spaces)}/{len(ccc)}/{len(decomps)}/{len(compositions)}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python3 export_tokenizer.py tokenizer.json tokenizer.bin")
    export_tokenizer(sys.argv[1], sys.argv[2])
