// tokenizer.h: the Qwen2/Qwen3 byte-level BPE tokenizer, id-for-id the same as Hugging Face tokenizers.
// Reads tokenizer.bin (layout documented in export.py). Single header, C99 (+ POSIX fstat), no regex library.
//
// Encoding follows tokenizer.json's pipeline:
//   1. added tokens (<|im_start|>, <think>, ...) are cut out of the raw text, leftmost-longest;
//   2. each stretch between them is NFC-normalized;
//   3. split by the Qwen2 pre-tokenizer regex, written out by hand below (tok_split_next);
//   4. each piece is BPE-merged over its bytes, lowest merge rank first, leftmost on ties.
// Input must be valid UTF-8: HF works on Unicode strings and never sees invalid bytes, so instead of
// guessing a repair, tokenizer_encode rejects the text and reports where the first bad sequence starts.
// Assumes a little-endian host (x86, ARM), like the model file.

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/stat.h>

#define TOKENIZER_MAGIC "QTOK"
#define TOKENIZER_VERSION 1
#define TOKENIZER_HEADER_WORDS 12 // magic + version + 10 counts, in uint32 words

enum { TOK_LETTER = 1, TOK_NUMBER = 2, TOK_SPACE = 4, TOK_NFC = 8 }; // TOK_NFC: NFC may change it
#define TOK_UNICODE_MAX 0x10FFFF
#define TOK_HANGUL_S_BASE 0xAC00
#define TOK_HANGUL_L_BASE 0x1100
#define TOK_HANGUL_V_BASE 0x1161
#define TOK_HANGUL_T_BASE 0x11A7
#define TOK_HANGUL_L_COUNT 19
#define TOK_HANGUL_V_COUNT 21
#define TOK_HANGUL_T_COUNT 28
#define TOK_HANGUL_S_COUNT (TOK_HANGUL_L_COUNT * TOK_HANGUL_V_COUNT * TOK_HANGUL_T_COUNT)
// Unicode's longest full canonical decomposition: 4 code points, 3 levels (U+1F82 -> U+1F02 U+0345 ->
// U+1F00 U+0300 U+0345 -> U+03B1 U+0313 U+0300 U+0345). The loader refuses tables beyond that, which
// bounds what NFC can expand a text to and the work of checking the table.
#define TOK_DECOMP_MAX_LENGTH 4
#define TOK_DECOMP_MAX_DEPTH 3

typedef struct {
    unsigned char* data; // the whole file; the pointers below point into it
    int n_tokens, n_merges, n_added;
    const uint32_t* piece_offsets; // [n_tokens + 1]
    const unsigned char* piece_bytes;
    const uint32_t* merges; // [n_merges][2]: merge rank r joins (left, right) into id 256 + r
    const uint32_t* added;  // [n_added][2]: (id, flags)
    const uint32_t* ccc;    // [n_ccc][3]: (first, last, combining class)
    const uint32_t* decomps; // [n_decomps][3]: (code point, first, second or 0)
    const uint32_t* compositions; // [n_compositions][3]: (first, second, composite)
    uint32_t n_ccc, n_decomps, n_compositions;
    int byte_token[256];       // id of each single byte
    unsigned char* cp_class;   // [TOK_UNICODE_MAX + 1] TOK_LETTER etc. bits
    uint64_t* merge_keys;      // hash table (left << 32 | right) -> merge_ranks, open addressing
    int* merge_ranks;
    uint32_t merge_mask;
    int* piece_ids;            // hash table of piece bytes -> id, -1 = empty slot
    uint32_t piece_mask;
    int* added_by_length;      // added token ids, longest first: the first match is the longest
    unsigned char added_first_byte[256]; // 1 where some added token starts with that byte
} Tokenizer;

static void tokenizer_fail(const char* path, const char* what) {
    fprintf(stderr, "error: tokenizer %s: %s\n", path, what);
    exit(1);
}

// ----------------------------------------------------------------------------
// UTF-8

// Length of the well-formed UTF-8 sequence at s[0..n), or 0 if it is ill-formed (Unicode table 3-7).
static int utf8_sequence_length(const unsigned char* s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    int len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    if (len == 0 || (size_t)len > n) return 0;
    unsigned char lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;
    unsigned char hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
    if (s[1] < lo || s[1] > hi) return 0;
    for (int i = 2; i < len; i++) if ((s[i] & 0xC0) != 0x80) return 0;
    return len;
}

// Offset of the first ill-formed sequence in s[0..n), or n if it is all valid UTF-8.
static size_t utf8_first_invalid(const unsigned char* s, size_t n) {
    for (size_t i = 0; i < n;) {
        int len = utf8_sequence_length(s + i, n - i);
        if (len == 0) return i;
        i += (size_t)len;
    }
    return n;
}

static uint32_t utf8_decode(const unsigned char* s, int len) {
    if (len == 1) return s[0];
    uint32_t c = s[0] & (0x7F >> len);
    for (int i = 1; i < len; i++) c = c << 6 | (s[i] & 0x3F);
    return c;
}

static int utf8_encode(uint32_t c, unsigned char* out) {
    if (c < 0x80) { out[0] = (unsigned char)c; return 1; }
    if (c < 0x800) { out[0] = (unsigned char)(0xC0 | c >> 6); out[1] = (unsigned char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        out[0] = (unsigned char)(0xE0 | c >> 12); out[1] = (unsigned char)(0x80 | (c >> 6 & 0x3F));
        out[2] = (unsigned char)(0x80 | (c & 0x3F)); return 3;
    }
    out[0] = (unsigned char)(0xF0 | c >> 18); out[1] = (unsigned char)(0x80 | (c >> 12 & 0x3F));
    out[2] = (unsigned char)(0x80 | (c >> 6 & 0x3F)); out[3] = (unsigned char)(0x80 | (c & 0x3F)); return 4;
}

// ----------------------------------------------------------------------------
// loading

static uint32_t tok_hash_u64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    return (uint32_t)x;
}

static uint32_t tok_hash_bytes(const unsigned char* s, size_t n) {
    uint32_t h = 2166136261u; // FNV-1a
    for (size_t i = 0; i < n; i++) { h ^= s[i]; h *= 16777619u; }
    return h;
}

static uint32_t tok_table_size(uint32_t n) { // power of two, at most half full
    uint32_t size = 1;
    while (size < 2 * n) size <<= 1;
    return size;
}

static int tokenizer_merge_rank(const Tokenizer* t, int left, int right) {
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint32_t h = tok_hash_u64(key) & t->merge_mask;; h = (h + 1) & t->merge_mask) {
        if (t->merge_ranks[h] < 0) return -1;
        if (t->merge_keys[h] == key) return t->merge_ranks[h];
    }
}

// Reads a uint32 section of count * width words at *pos, checking it lies inside the file.
static const uint32_t* tokenizer_section(const Tokenizer* t, size_t size, size_t* pos, uint64_t count,
                                         uint64_t width, const char* path, const char* name) {
    uint64_t bytes = count * width * 4;
    if (bytes > size - *pos) {
        char msg[128];
        snprintf(msg, sizeof msg, "truncated or corrupt: %s section does not fit in the file", name);
        tokenizer_fail(path, msg);
    }
    const uint32_t* p = (const uint32_t*)(t->data + *pos);
    *pos += (size_t)bytes;
    return p;
}

static void tokenizer_check_ranges(const uint32_t* r, uint32_t n, size_t width, const char* path, const char* name) {
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t* e = r + (size_t)i * width;
        if (e[0] > e[1] || e[1] > TOK_UNICODE_MAX || (i > 0 && e[0] <= *(e - width + 1))) {
            char msg[128];
            snprintf(msg, sizeof msg, "corrupt %s table (range %u)", name, i);
            tokenizer_fail(path, msg);
        }
    }
}

static void tokenizer_mark_ranges(Tokenizer* t, const uint32_t* r, uint32_t n, size_t width, unsigned char bit) {
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t c = r[(size_t)i * width]; c <= r[(size_t)i * width + 1]; c++) t->cp_class[c] |= bit;
}

static const uint32_t* tokenizer_find_decomp(const Tokenizer* t, uint32_t c) {
    uint32_t lo = 0, hi = t->n_decomps;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        const uint32_t* e = t->decomps + (size_t)mid * 3;
        if (e[0] == c) return e;
        if (e[0] < c) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

// Number of code points tok_decompose writes for c (a Hangul syllable gives its 2 or 3 jamo), or -1 if
// that takes more than `depth` levels (a cycle in a corrupt table). tok_nfc sizes its buffer with it.
static int tokenizer_decomp_length(const Tokenizer* t, uint32_t c, int depth) {
    if (c - TOK_HANGUL_S_BASE < TOK_HANGUL_S_COUNT) return (c - TOK_HANGUL_S_BASE) % TOK_HANGUL_T_COUNT ? 3 : 2;
    const uint32_t* e = tokenizer_find_decomp(t, c);
    if (!e) return 1;
    if (depth == 0) return -1;
    int a = tokenizer_decomp_length(t, e[1], depth - 1);
    int b = e[2] ? tokenizer_decomp_length(t, e[2], depth - 1) : 0;
    return a < 0 || b < 0 ? -1 : a + b;
}

void tokenizer_load(Tokenizer* t, const char* path) {
    memset(t, 0, sizeof *t);
    FILE* f = fopen(path, "rb");
    if (!f) tokenizer_fail(path, strerror(errno));
    struct stat st; // a regular file only: a directory, a pipe or /dev/zero has no size to read
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) tokenizer_fail(path, "not a regular file");
    size_t size = (size_t)st.st_size;
    t->data = malloc(size + 1); // + 1: not NULL for an empty file
    if (!t->data) tokenizer_fail(path, "out of memory");
    if (fread(t->data, 1, size, f) != size) tokenizer_fail(path, ferror(f) ? strerror(errno) : "read error");
    fclose(f);

    if (size < TOKENIZER_HEADER_WORDS * 4) tokenizer_fail(path, "file too short for the header");
    if (memcmp(t->data, TOKENIZER_MAGIC, 4) != 0) tokenizer_fail(path, "bad magic, not a tokenizer.bin");
    uint32_t header[TOKENIZER_HEADER_WORDS];
    memcpy(header, t->data, sizeof header);
    if (header[1] != TOKENIZER_VERSION) {
        char msg[96];
        snprintf(msg, sizeof msg, "version %u, expected %d (re-export it)", header[1], TOKENIZER_VERSION);
        tokenizer_fail(path, msg);
    }
    uint32_t n_tokens = header[2], n_merges = header[3], n_added = header[4], n_letters = header[5],
             n_numbers = header[6], n_spaces = header[7], n_piece_bytes = header[11];
    t->n_ccc = header[8]; t->n_decomps = header[9]; t->n_compositions = header[10];
    if (n_tokens < 256 || n_tokens > (1u << 30) || (uint64_t)n_merges + 256 > n_tokens || n_added > n_tokens)
        tokenizer_fail(path, "corrupt header: impossible token, merge or added-token counts");

    size_t pos = TOKENIZER_HEADER_WORDS * 4;
    t->n_tokens = (int)n_tokens; t->n_merges = (int)n_merges; t->n_added = (int)n_added;
    t->piece_offsets = tokenizer_section(t, size, &pos, (uint64_t)n_tokens + 1, 1, path, "piece offsets");
    t->piece_bytes = (const unsigned char*)tokenizer_section(t, size, &pos, ((uint64_t)n_piece_bytes + 3) / 4, 1,
                                                             path, "piece bytes");
    t->merges = tokenizer_section(t, size, &pos, n_merges, 2, path, "merges");
    t->added = tokenizer_section(t, size, &pos, n_added, 2, path, "added tokens");
    const uint32_t* letters = tokenizer_section(t, size, &pos, n_letters, 2, path, "letters");
    const uint32_t* numbers = tokenizer_section(t, size, &pos, n_numbers, 2, path, "numbers");
    const uint32_t* spaces = tokenizer_section(t, size, &pos, n_spaces, 2, path, "white space");
    t->ccc = tokenizer_section(t, size, &pos, t->n_ccc, 3, path, "combining classes");
    t->decomps = tokenizer_section(t, size, &pos, t->n_decomps, 3, path, "decompositions");
    t->compositions = tokenizer_section(t, size, &pos, t->n_compositions, 3, path, "compositions");
    if (pos != size) tokenizer_fail(path, "corrupt: file size does not match the header's counts");

    // token pieces: offsets in order, ids 0..255 are the 256 single bytes
    if (t->piece_offsets[0] != 0 || t->piece_offsets[n_tokens] != n_piece_bytes)
        tokenizer_fail(path, "corrupt piece offsets");
    for (uint32_t i = 0; i < n_tokens; i++)
        if (t->piece_offsets[i] > t->piece_offsets[i + 1]) tokenizer_fail(path, "corrupt piece offsets");
    for (int b = 0; b < 256; b++) t->byte_token[b] = -1;
    for (int i = 0; i < 256; i++) {
        if (t->piece_offsets[i + 1] - t->piece_offsets[i] != 1) tokenizer_fail(path, "ids 0..255 are not single bytes");
        t->byte_token[t->piece_bytes[t->piece_offsets[i]]] = i;
    }
    for (int b = 0; b < 256; b++)
        if (t->byte_token[b] < 0) tokenizer_fail(path, "ids 0..255 do not cover all 256 bytes");

    // merges: each result's text is its two parts' texts joined
    t->merge_mask = tok_table_size(n_merges) - 1;
    t->merge_keys = malloc(((size_t)t->merge_mask + 1) * sizeof *t->merge_keys);
    t->merge_ranks = malloc(((size_t)t->merge_mask + 1) * sizeof *t->merge_ranks);
    if (!t->merge_keys || !t->merge_ranks) tokenizer_fail(path, "out of memory");
    memset(t->merge_ranks, 0xff, ((size_t)t->merge_mask + 1) * sizeof *t->merge_ranks);
    for (uint32_t r = 0; r < n_merges; r++) {
        uint32_t left = t->merges[2 * r], right = t->merges[2 * r + 1], id = 256 + r;
        if (left >= n_tokens || right >= n_tokens) tokenizer_fail(path, "corrupt merges: id out of range");
        uint32_t len_l = t->piece_offsets[left + 1] - t->piece_offsets[left];
        uint32_t len_r = t->piece_offsets[right + 1] - t->piece_offsets[right];
        const unsigned char* joined = t->piece_bytes + t->piece_offsets[id];
        if (t->piece_offsets[id + 1] - t->piece_offsets[id] != len_l + len_r ||
            memcmp(joined, t->piece_bytes + t->piece_offsets[left], len_l) != 0 ||
            memcmp(joined + len_l, t->piece_bytes + t->piece_offsets[right], len_r) != 0)
            tokenizer_fail(path, "corrupt merges: a merge's text is not its parts' texts joined");
        uint64_t key = (uint64_t)left << 32 | right;
        uint32_t h = tok_hash_u64(key) & t->merge_mask;
        while (t->merge_ranks[h] >= 0 && t->merge_keys[h] != key) h = (h + 1) & t->merge_mask;
        if (t->merge_ranks[h] < 0) { t->merge_keys[h] = key; t->merge_ranks[h] = (int)r; }
    }

    // exact-text lookup; the lowest id wins if two tokens share a text
    t->piece_mask = tok_table_size(n_tokens) - 1;
    t->piece_ids = malloc(((size_t)t->piece_mask + 1) * sizeof *t->piece_ids);
    if (!t->piece_ids) tokenizer_fail(path, "out of memory");
    memset(t->piece_ids, 0xff, ((size_t)t->piece_mask + 1) * sizeof *t->piece_ids);
    for (uint32_t i = 0; i < n_tokens; i++) {
        const unsigned char* s = t->piece_bytes + t->piece_offsets[i];
        uint32_t n = t->piece_offsets[i + 1] - t->piece_offsets[i];
        uint32_t h = tok_hash_bytes(s, n) & t->piece_mask;
        for (;; h = (h + 1) & t->piece_mask) {
            int other = t->piece_ids[h];
            if (other < 0) { t->piece_ids[h] = (int)i; break; }
            if (t->piece_offsets[other + 1] - t->piece_offsets[other] == n &&
                memcmp(t->piece_bytes + t->piece_offsets[other], s, n) == 0) break;
        }
    }

    // added tokens, longest first
    t->added_by_length = malloc((n_added + 1) * sizeof *t->added_by_length);
    if (!t->added_by_length) tokenizer_fail(path, "out of memory");
    for (uint32_t i = 0; i < n_added; i++) {
        uint32_t id = t->added[2 * i], flags = t->added[2 * i + 1];
        if (id >= n_tokens || flags > 1 || t->piece_offsets[id + 1] == t->piece_offsets[id])
            tokenizer_fail(path, "corrupt added tokens");
        // an added token is a string: valid UTF-8, so that it matches the text only at character boundaries
        // and the stretches cut around it stay valid UTF-8
        uint32_t len = t->piece_offsets[id + 1] - t->piece_offsets[id];
        if (utf8_first_invalid(t->piece_bytes + t->piece_offsets[id], len) != len)
            tokenizer_fail(path, "corrupt added tokens: a text that is not valid UTF-8");
        int j = (int)i;
        for (; j > 0; j--) { // insertion sort by length, longest first
            int prev = t->added_by_length[j - 1];
            if (t->piece_offsets[prev + 1] - t->piece_offsets[prev] >= len) break;
            t->added_by_length[j] = prev;
        }
        t->added_by_length[j] = (int)id;
        t->added_first_byte[t->piece_bytes[t->piece_offsets[id]]] = 1;
    }

    // Unicode tables
    tokenizer_check_ranges(letters, n_letters, 2, path, "letters");
    tokenizer_check_ranges(numbers, n_numbers, 2, path, "numbers");
    tokenizer_check_ranges(spaces, n_spaces, 2, path, "white space");
    tokenizer_check_ranges(t->ccc, t->n_ccc, 3, path, "combining class");
    for (uint32_t i = 0; i < t->n_ccc; i++)
        if (t->ccc[3 * i + 2] == 0 || t->ccc[3 * i + 2] > 254) tokenizer_fail(path, "corrupt combining class table");
    for (uint32_t i = 0; i < t->n_decomps; i++) {
        const uint32_t* e = t->decomps + 3 * (size_t)i;
        if (e[0] > TOK_UNICODE_MAX || e[1] > TOK_UNICODE_MAX || e[2] > TOK_UNICODE_MAX || e[1] == 0 ||
            (i > 0 && e[0] <= e[-3]))
            tokenizer_fail(path, "corrupt decomposition table");
    }
    for (uint32_t i = 0; i < t->n_decomps; i++) {
        int len = tokenizer_decomp_length(t, t->decomps[3 * i], TOK_DECOMP_MAX_DEPTH);
        if (len < 0 || len > TOK_DECOMP_MAX_LENGTH)
            tokenizer_fail(path, "corrupt decomposition table (a cycle, or longer than any Unicode decomposition)");
    }
    for (uint32_t i = 0; i < t->n_compositions; i++) {
        const uint32_t* e = t->compositions + 3 * (size_t)i;
        if (e[0] > TOK_UNICODE_MAX || e[1] > TOK_UNICODE_MAX || e[2] > TOK_UNICODE_MAX ||
            (i > 0 && (e[0] < e[-3] || (e[0] == e[-3] && e[1] <= e[-2]))))
            tokenizer_fail(path, "corrupt composition table");
    }
    t->cp_class = calloc(TOK_UNICODE_MAX + 1, 1);
    if (!t->cp_class) tokenizer_fail(path, "out of memory");
    tokenizer_mark_ranges(t, letters, n_letters, 2, TOK_LETTER);
    tokenizer_mark_ranges(t, numbers, n_numbers, 2, TOK_NUMBER);
    tokenizer_mark_ranges(t, spaces, n_spaces, 2, TOK_SPACE);
    // TOK_NFC marks what NFC can touch: marks, decomposables, and second halves of compositions
    tokenizer_mark_ranges(t, t->ccc, t->n_ccc, 3, TOK_NFC);
    for (uint32_t i = 0; i < t->n_decomps; i++) t->cp_class[t->decomps[3 * i]] |= TOK_NFC;
    for (uint32_t i = 0; i < t->n_compositions; i++) t->cp_class[t->compositions[3 * i + 1]] |= TOK_NFC;
    for (uint32_t c = TOK_HANGUL_V_BASE; c < TOK_HANGUL_V_BASE + TOK_HANGUL_V_COUNT; c++) t->cp_class[c] |= TOK_NFC;
    for (uint32_t c = TOK_HANGUL_T_BASE + 1; c < TOK_HANGUL_T_BASE + TOK_HANGUL_T_COUNT; c++) t->cp_class[c] |= TOK_NFC;
}

void tokenizer_free(Tokenizer* t) {
    free(t->data); free(t->cp_class); free(t->merge_keys); free(t->merge_ranks);
    free(t->piece_ids); free(t->added_by_length);
    memset(t, 0, sizeof *t);
}

int tokenizer_vocab_size(const Tokenizer* t) { return t->n_tokens; }

const char* tokenizer_piece(const Tokenizer* t, int id, size_t* len) {
    if (id < 0 || id >= t->n_tokens) { *len = 0; return ""; }
    *len = t->piece_offsets[id + 1] - t->piece_offsets[id];
    return (const char*)t->piece_bytes + t->piece_offsets[id];
}

int tokenizer_find(const Tokenizer* t, const char* text) {
    size_t n = strlen(text);
    for (uint32_t h = tok_hash_bytes((const unsigned char*)text, n) & t->piece_mask;; h = (h + 1) & t->piece_mask) {
        int id = t->piece_ids[h];
        if (id < 0) return -1;
        if (t->piece_offsets[id + 1] - t->piece_offsets[id] == n &&
            memcmp(t->piece_bytes + t->piece_offsets[id], text, n) == 0) return id;
    }
}

// ----------------------------------------------------------------------------
// encoding

typedef struct { // growable buffers reused across one tokenizer_encode call
    int* ids; size_t n_ids, cap_ids;
    uint32_t* cps; size_t cap_cps;      // code points of the current stretch (+ NFC's sorting scratch)
    uint32_t* decomposed; size_t cap_decomposed; // NFC's decomposition of the stretch
    unsigned char* bytes; size_t cap_bytes; // UTF-8 of the current piece
    int* symbols; size_t cap_symbols;   // BPE symbols as a linked list: ids, then prev, then next
    uint64_t* heap; size_t cap_heap;    // BPE candidate merges, (rank << 32 | position), min first
} TokenizerEncodeState;

static void* tok_grow(void* p, size_t* cap, size_t need, size_t elem) {
    if (need <= *cap) return p;
    size_t cap2 = *cap ? *cap : 64;
    while (cap2 < need) cap2 *= 2;
    p = realloc(p, cap2 * elem);
    if (!p) { fprintf(stderr, "error: tokenizer: out of memory\n"); exit(1); }
    *cap = cap2;
    return p;
}

static void tok_push_id(TokenizerEncodeState* st, int id) {
    st->ids = tok_grow(st->ids, &st->cap_ids, st->n_ids + 1, sizeof *st->ids);
    st->ids[st->n_ids++] = id;
}

static int tok_combining_class(const Tokenizer* t, uint32_t c) {
    if (!(t->cp_class[c] & TOK_NFC)) return 0;
    uint32_t lo = 0, hi = t->n_ccc;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        const uint32_t* e = t->ccc + 3 * (size_t)mid;
        if (c < e[0]) hi = mid; else if (c > e[1]) lo = mid + 1; else return (int)e[2];
    }
    return 0;
}

static uint32_t tok_compose_pair(const Tokenizer* t, uint32_t a, uint32_t b) { // 0 if none
    if (a - TOK_HANGUL_L_BASE < TOK_HANGUL_L_COUNT && b - TOK_HANGUL_V_BASE < TOK_HANGUL_V_COUNT)
        return TOK_HANGUL_S_BASE + ((a - TOK_HANGUL_L_BASE) * TOK_HANGUL_V_COUNT + (b - TOK_HANGUL_V_BASE)) * TOK_HANGUL_T_COUNT;
    if (a - TOK_HANGUL_S_BASE < TOK_HANGUL_S_COUNT && (a - TOK_HANGUL_S_BASE) % TOK_HANGUL_T_COUNT == 0 &&
        b - TOK_HANGUL_T_BASE - 1 < TOK_HANGUL_T_COUNT - 1)
        return a + (b - TOK_HANGUL_T_BASE);
    uint32_t lo = 0, hi = t->n_compositions;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        const uint32_t* e = t->compositions + 3 * (size_t)mid;
        if (e[0] == a && e[1] == b) return e[2];
        if (e[0] < a || (e[0] == a && e[1] < b)) lo = mid + 1; else hi = mid;
    }
    return 0;
}

// Appends the full canonical decomposition of c to out (as ccc << 21 | code point): the
// tokenizer_decomp_length(c) code points tok_nfc made room for. Returns the new length.
static size_t tok_decompose(const Tokenizer* t, uint32_t c, uint32_t* out, size_t n) {
    if (c - TOK_HANGUL_S_BASE < TOK_HANGUL_S_COUNT) {
        uint32_t s = c - TOK_HANGUL_S_BASE;
        out[n++] = TOK_HANGUL_L_BASE + s / (TOK_HANGUL_V_COUNT * TOK_HANGUL_T_COUNT);
        out[n++] = TOK_HANGUL_V_BASE + s % (TOK_HANGUL_V_COUNT * TOK_HANGUL_T_COUNT) / TOK_HANGUL_T_COUNT;
        if (s % TOK_HANGUL_T_COUNT) out[n++] = TOK_HANGUL_T_BASE + s % TOK_HANGUL_T_COUNT;
        return n;
    }
    const uint32_t* e = (t->cp_class[c] & TOK_NFC) ? tokenizer_find_decomp(t, c) : NULL;
    if (!e) { out[n++] = (uint32_t)tok_combining_class(t, c) << 21 | c; return n; }
    n = tok_decompose(t, e[1], out, n);
    return e[2] ? tok_decompose(t, e[2], out, n) : n;
}

// NFC of st->cps[0..n) in place; returns the new length.
static size_t tok_nfc(const Tokenizer* t, TokenizerEncodeState* st, size_t n) {
    // full decomposition into st->decomposed, then canonical ordering, then composition
    size_t cap = 0;
    for (size_t i = 0; i < n; i++) cap += (size_t)tokenizer_decomp_length(t, st->cps[i], TOK_DECOMP_MAX_DEPTH);
    st->decomposed = tok_grow(st->decomposed, &st->cap_decomposed, cap, sizeof *st->decomposed);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) m = tok_decompose(t, st->cps[i], st->decomposed, m);
    st->cps = tok_grow(st->cps, &st->cap_cps, 2 * m, sizeof *st->cps); // second half: counting-sort scratch
    memcpy(st->cps, st->decomposed, m * sizeof *st->cps);
    uint32_t* d = st->cps;

    // canonical ordering: stable sort of each run of nonzero combining classes by class
    for (size_t i = 0; i < m;) {
        if (d[i] >> 21 == 0) { i++; continue; }
        size_t end = i;
        while (end < m && d[end] >> 21 != 0) end++;
        if (end - i <= 16) {
            for (size_t j = i + 1; j < end; j++) // insertion sort
                for (size_t k = j; k > i && d[k - 1] >> 21 > d[k] >> 21; k--) {
                    uint32_t tmp = d[k]; d[k] = d[k - 1]; d[k - 1] = tmp;
                }
        } else { // counting sort: long runs stay linear
            size_t count[256] = {0};
            uint32_t* tmp = d + m;
            for (size_t j = i; j < end; j++) count[d[j] >> 21]++;
            for (size_t c = 1, sum = 0; c < 256; c++) { size_t k = count[c]; count[c] = sum; sum += k; }
            for (size_t j = i; j < end; j++) tmp[count[d[j] >> 21]++] = d[j];
            memcpy(d + i, tmp, (end - i) * sizeof *d);
        }
        i = end;
    }

    // composition: each mark joins the last starter unless blocked by a mark of the same or higher class
    size_t w = 0, starter = SIZE_MAX;
    uint32_t last_class = 0;
    for (size_t i = 0; i < m; i++) {
        uint32_t c = d[i] & 0x1FFFFF, cls = d[i] >> 21;
        if (starter != SIZE_MAX && (w == starter + 1 || last_class < cls)) {
            uint32_t composite = tok_compose_pair(t, d[starter], c);
            if (composite) { d[starter] = composite; continue; }
        }
        if (cls == 0) starter = w;
        last_class = cls;
        d[w++] = c;
    }
    return w;
}

static int tok_is_letter(const Tokenizer* t, uint32_t c) { return t->cp_class[c] & TOK_LETTER; }
static int tok_is_number(const Tokenizer* t, uint32_t c) { return t->cp_class[c] & TOK_NUMBER; }
static int tok_is_space(const Tokenizer* t, uint32_t c) { return t->cp_class[c] & TOK_SPACE; }
static int tok_is_other(const Tokenizer* t, uint32_t c) {
    return !(t->cp_class[c] & (TOK_LETTER | TOK_NUMBER | TOK_SPACE));
}
static int tok_is_newline(uint32_t c) { return c == '\r' || c == '\n'; }

static uint32_t tok_contraction_fold(uint32_t c) { // the case folding that (?i:'s|...) applies
    if (c >= 'A' && c <= 'Z') return c | 0x20;
    return c == 0x17F ? 's' : c; // LATIN SMALL LETTER LONG S folds to s
}

// End of the pre-token starting at i: the Qwen2 regex
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// tried alternative by alternative, as the regex engine does.
static size_t tok_split_next(const Tokenizer* t, const uint32_t* cp, size_t n, size_t i) {
    uint32_t c = cp[i];
    if (c == '\'' && i + 1 < n) {
        uint32_t a = tok_contraction_fold(cp[i + 1]);
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < n) {
            uint32_t b = tok_contraction_fold(cp[i + 2]);
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
        }
    }
    size_t j = i;
    if (!tok_is_letter(t, c) && !tok_is_number(t, c) && !tok_is_newline(c) && i + 1 < n && tok_is_letter(t, cp[i + 1])) j++;
    if (tok_is_letter(t, cp[j])) {
        while (j < n && tok_is_letter(t, cp[j])) j++;
        return j;
    }
    if (tok_is_number(t, c)) return i + 1;
    j = i;
    if (c == ' ' && i + 1 < n && tok_is_other(t, cp[i + 1])) j++;
    if (tok_is_other(t, cp[j])) {
        while (j < n && tok_is_other(t, cp[j])) j++;
        while (j < n && tok_is_newline(cp[j])) j++;
        return j;
    }
    // c is white space: the run up to its last newline, or all but its last char if a non-space follows
    size_t end = i, after_newline = 0;
    while (end < n && tok_is_space(t, cp[end])) {
        if (tok_is_newline(cp[end])) after_newline = end + 1;
        end++;
    }
    if (after_newline) return after_newline;
    if (end < n && end - i >= 2) return end - 1;
    return end;
}

static void tok_heap_push(uint64_t* heap, size_t* n, uint64_t x) {
    size_t i = (*n)++;
    while (i > 0 && heap[(i - 1) / 2] > x) { heap[i] = heap[(i - 1) / 2]; i = (i - 1) / 2; }
    heap[i] = x;
}

static uint64_t tok_heap_pop(uint64_t* heap, size_t* n) {
    uint64_t top = heap[0], x = heap[--*n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && heap[child + 1] < heap[child]) child++;
        if (heap[child] >= x) break;
        heap[i] = heap[child]; i = child;
    }
    heap[i] = x;
    return top;
}

static void tok_bpe_push_pair(const Tokenizer* t, uint64_t* heap, size_t* n_heap, const int* sym, int pos, int right) {
    int rank = tokenizer_merge_rank(t, sym[pos], sym[right]);
    if (rank >= 0) tok_heap_push(heap, n_heap, (uint64_t)rank << 32 | (uint32_t)pos);
}

// BPE over one piece's bytes: repeatedly apply the lowest-ranked merge, leftmost first. O(n log n).
static void tok_bpe(const Tokenizer* t, TokenizerEncodeState* st, const unsigned char* s, size_t n) {
    if (n == 1) { tok_push_id(st, t->byte_token[s[0]]); return; }
    st->symbols = tok_grow(st->symbols, &st->cap_symbols, 3 * n, sizeof *st->symbols);
    st->heap = tok_grow(st->heap, &st->cap_heap, 3 * n, sizeof *st->heap);
    int* sym = st->symbols; int* prev = sym + n; int* next = sym + 2 * n;
    size_t n_heap = 0;
    for (size_t i = 0; i < n; i++) { sym[i] = t->byte_token[s[i]]; prev[i] = (int)i - 1; next[i] = (int)i + 1; }
    for (size_t i = 0; i + 1 < n; i++) tok_bpe_push_pair(t, st->heap, &n_heap, sym, (int)i, (int)i + 1);
    while (n_heap > 0) {
        uint64_t top = tok_heap_pop(st->heap, &n_heap);
        int rank = (int)(top >> 32), pos = (int)(uint32_t)top;
        int right = next[pos];
        // skip entries made stale by earlier merges
        if (sym[pos] < 0 || right >= (int)n || (uint32_t)sym[pos] != t->merges[2 * rank] ||
            (uint32_t)sym[right] != t->merges[2 * rank + 1]) continue;
        sym[pos] = 256 + rank;
        sym[right] = -1;
        next[pos] = next[right];
        if (next[pos] < (int)n) prev[next[pos]] = pos;
        if (prev[pos] >= 0) tok_bpe_push_pair(t, st->heap, &n_heap, sym, prev[pos], pos);
        if (next[pos] < (int)n) tok_bpe_push_pair(t, st->heap, &n_heap, sym, pos, next[pos]);
    }
    for (int i = 0; i < (int)n; i = next[i]) tok_push_id(st, sym[i]);
}

// Encodes text between added tokens (valid UTF-8).
static void tok_encode_stretch(const Tokenizer* t, TokenizerEncodeState* st, const unsigned char* s, size_t len) {
    st->cps = tok_grow(st->cps, &st->cap_cps, len, sizeof *st->cps);
    size_t n = 0;
    int needs_nfc = 0;
    for (size_t i = 0; i < len;) {
        int l = utf8_sequence_length(s + i, len - i);
        uint32_t c = utf8_decode(s + i, l);
        needs_nfc |= t->cp_class[c] & TOK_NFC;
        st->cps[n++] = c;
        i += (size_t)l;
    }
    if (needs_nfc) n = tok_nfc(t, st, n);
    for (size_t i = 0; i < n;) {
        size_t end = tok_split_next(t, st->cps, n, i);
        st->bytes = tok_grow(st->bytes, &st->cap_bytes, 4 * (end - i), 1);
        size_t nb = 0;
        for (size_t k = i; k < end; k++) nb += (size_t)utf8_encode(st->cps[k], st->bytes + nb);
        tok_bpe(t, st, st->bytes, nb);
        i = end;
    }
}

long tokenizer_encode(const Tokenizer* t, const char* text, size_t len, int** ids, size_t* bad_offset) {
    const unsigned char* s = (const unsigned char*)text;
    *ids = NULL;
    size_t bad = utf8_first_invalid(s, len);
    if (bad < len) { if (bad_offset) *bad_offset = bad; return -1; }
    TokenizerEncodeState st;
    memset(&st, 0, sizeof st);
    size_t stretch = 0;
    for (size_t i = 0; i < len; i++) {
        if (!t->added_first_byte[s[i]]) continue;
        for (int k = 0; k < t->n_added; k++) {
            int id = t->added_by_length[k];
            size_t n = t->piece_offsets[id + 1] - t->piece_offsets[id];
            if (n <= len - i && memcmp(s + i, t->piece_bytes + t->piece_offsets[id], n) == 0) {
                tok_encode_stretch(t, &st, s + stretch, i - stretch);
                tok_push_id(&st, id);
                stretch = i + n;
                i = stretch - 1;
                break;
            }
        }
    }
    tok_encode_stretch(t, &st, s + stretch, len - stretch);
    free(st.cps); free(st.decomposed); free(st.bytes); free(st.symbols); free(st.heap);
    *ids = st.ids ? st.ids : malloc(sizeof(int));
    return (long)st.n_ids;
}

// ----------------------------------------------------------------------------
// streaming decode: token pieces may split a UTF-8 character; hold its start back until it completes

typedef struct { unsigned char pending[4]; int n; } Utf8Stream;

static const char tok_utf8_replacement[] = "\xEF\xBF\xBD"; // U+FFFD

void utf8_stream_write(Utf8Stream* s, const char* bytes, size_t len, FILE* out) {
    for (size_t i = 0; i < len; i++) {
        unsigned char b = (unsigned char)bytes[i];
        if (s->n > 0) {
            // does b continue the pending sequence? (same rules as utf8_sequence_length)
            unsigned char lead = s->pending[0];
            unsigned char lo = s->n == 1 && lead == 0xE0 ? 0xA0 : s->n == 1 && lead == 0xF0 ? 0x90 : 0x80;
            unsigned char hi = s->n == 1 && lead == 0xED ? 0x9F : s->n == 1 && lead == 0xF4 ? 0x8F : 0xBF;
            if (b >= lo && b <= hi) {
                s->pending[s->n++] = b;
                int need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
                if (s->n == need) { fwrite(s->pending, 1, (size_t)s->n, out); s->n = 0; }
                continue;
            }
            // a broken sequence: one U+FFFD for the bytes so far (HF's from_utf8_lossy does the same),
            // then b starts afresh
            fputs(tok_utf8_replacement, out);
            s->n = 0;
        }
        if (b < 0x80) fputc(b, out);
        else if (b >= 0xC2 && b <= 0xF4) s->pending[s->n++] = b;
        else fputs(tok_utf8_replacement, out);
    }
}

void utf8_stream_flush(Utf8Stream* s, FILE* out) {
    if (s->n > 0) fputs(tok_utf8_replacement, out);
    s->n = 0;
}
