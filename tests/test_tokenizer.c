// Test driver for tokenizer.h, run by tests/test_tokenizer.py.
//   test_tokenizer load TOKENIZER_BIN              load only (exit 0, or the loader's error and exit 1)
//   test_tokenizer goldens TOKENIZER_BIN CASES     check every case; CASES lines: "FLAG HEX N ID..." where
//                                                  HEX is the text ("-" if empty), FLAG R = decoding the
//                                                  ids must give the text back, - = no round trip (NFC)
//   test_tokenizer encode TOKENIZER_BIN            stdin -> ids on one line, or "invalid UTF-8 at OFFSET"
//   test_tokenizer speed TOKENIZER_BIN FILE        time encoding FILE (best of 3)
//   test_tokenizer stream MAX_CHUNK                stdin -> stdout through Utf8Stream in chunks of
//                                                  1..MAX_CHUNK bytes, checking the output after each write
//   test_tokenizer decode TOKENIZER_BIN            ids on stdin -> stdout, one piece per write, checked alike
//   test_tokenizer info TOKENIZER_BIN              vocab size, a few lookups and piece lengths
#define _POSIX_C_SOURCE 200809L // strtok_r, open_memstream, clock_gettime
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "../tokenizer.h"

static char* read_all(FILE* f, size_t* len) {
    size_t cap = 1 << 16, n = 0;
    char* buf = malloc(cap);
    for (;;) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        cap *= 2;
        buf = realloc(buf, cap);
    }
    *len = n;
    return buf;
}

static char* read_file(const char* path, size_t* len) {
    FILE* f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", path); exit(2); }
    char* buf = read_all(f, len);
    fclose(f);
    return buf;
}

static int hex_value(char c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; }

static void print_ids(const char* label, const int* ids, long n) {
    printf("    %s (%ld):", label, n);
    for (long i = 0; i < n && i < 40; i++) printf(" %d", ids[i]);
    printf(n > 40 ? " ...\n" : "\n");
}

static int run_goldens(const Tokenizer* t, const char* cases_path) {
    size_t len;
    char* data = read_file(cases_path, &len);
    int n_cases = 0, n_match = 0, n_roundtrip = 0, n_shown = 0;
    char* save = NULL;
    for (char* line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char* p = line;
        char flag = *p++;
        char* hex = strtok_r(p, " ", &p);
        size_t text_len = strcmp(hex, "-") == 0 ? 0 : strlen(hex) / 2;
        char* text = malloc(text_len + 1);
        for (size_t i = 0; i < text_len; i++) text[i] = (char)(hex_value(hex[2 * i]) << 4 | hex_value(hex[2 * i + 1]));
        long n_want = strtol(p, &p, 10);
        int* want = malloc((size_t)(n_want + 1) * sizeof *want);
        for (long i = 0; i < n_want; i++) want[i] = (int)strtol(p, &p, 10);

        int* got; size_t bad;
        long n_got = tokenizer_encode(t, text, text_len, &got, &bad);
        int ok = n_got == n_want && memcmp(got, want, (size_t)n_want * sizeof *want) == 0;
        if (ok && flag == 'R') {
            size_t pos = 0;
            for (long i = 0; i < n_got && ok; i++) {
                size_t piece_len;
                const char* piece = tokenizer_piece(t, got[i], &piece_len);
                ok = pos + piece_len <= text_len && memcmp(text + pos, piece, piece_len) == 0;
                pos += piece_len;
            }
            ok = ok && pos == text_len;
            n_roundtrip++;
        }
        n_cases++;
        n_match += ok;
        if (!ok && n_shown++ < 5) {
            printf("  case %d differs: text (%zu bytes) \"%.*s\"\n", n_cases, text_len, (int)(text_len < 200 ? text_len : 200), text);
            print_ids("want", want, n_want);
            print_ids("got ", got, n_got);
        }
        free(text); free(want); free(got);
    }
    free(data);
    printf("goldens: %d cases, %d match, %d round trips checked\n", n_cases, n_match, n_roundtrip);
    return n_match == n_cases ? 0 : 1;
}

static int run_encode(const Tokenizer* t) {
    size_t len;
    char* text = read_all(stdin, &len);
    int* ids; size_t bad;
    long n = tokenizer_encode(t, text, len, &ids, &bad);
    if (n < 0) printf("invalid UTF-8 at %zu\n", bad);
    for (long i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    if (n >= 0) printf("\n");
    free(ids); free(text);
    return 0;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int run_speed(const Tokenizer* t, const char* path) {
    size_t len;
    char* text = read_file(path, &len);
    double best = 1e9;
    long n = 0;
    for (int rep = 0; rep < 3; rep++) {
        int* ids; size_t bad;
        double t0 = now();
        n = tokenizer_encode(t, text, len, &ids, &bad);
        double dt = now() - t0;
        if (dt < best) best = dt;
        free(ids);
    }
    printf("encoded %zu bytes into %ld tokens in %.4f s\n", len, n, best);
    free(text);
    return n < 0;
}

// Streams chunks through a Utf8Stream, failing if the output is ever not valid UTF-8; writes it to stdout.
typedef struct { Utf8Stream stream; FILE* mem; char* out; size_t out_len; int broken; } StreamCheck;

static void stream_check_open(StreamCheck* c) {
    memset(c, 0, sizeof *c);
    c->mem = open_memstream(&c->out, &c->out_len);
}

static void stream_check_write(StreamCheck* c, const char* bytes, size_t len) {
    utf8_stream_write(&c->stream, bytes, len, c->mem);
    fflush(c->mem);
    for (size_t i = 0; i < c->out_len && !c->broken;) {
        int l = utf8_sequence_length((const unsigned char*)c->out + i, c->out_len - i);
        if (l == 0) { fprintf(stderr, "broken UTF-8 in the output at byte %zu\n", i); c->broken = 1; }
        i += (size_t)l;
    }
}

static int stream_check_close(StreamCheck* c) {
    utf8_stream_flush(&c->stream, c->mem);
    fclose(c->mem);
    fwrite(c->out, 1, c->out_len, stdout);
    free(c->out);
    return c->broken;
}

static int run_stream(int max_chunk) {
    size_t len;
    char* in = read_all(stdin, &len);
    StreamCheck c;
    stream_check_open(&c);
    for (size_t pos = 0, chunk = 1; pos < len && !c.broken; pos += chunk, chunk = chunk % (size_t)max_chunk + 1) {
        if (chunk > len - pos) chunk = len - pos;
        stream_check_write(&c, in + pos, chunk);
    }
    free(in);
    return stream_check_close(&c);
}

static int run_decode(const Tokenizer* t) {
    StreamCheck c;
    stream_check_open(&c);
    int id;
    while (!c.broken && scanf("%d", &id) == 1) {
        size_t len;
        const char* piece = tokenizer_piece(t, id, &len);
        stream_check_write(&c, piece, len);
    }
    return stream_check_close(&c);
}

static int run_info(const Tokenizer* t) {
    printf("vocab_size %d\n", tokenizer_vocab_size(t));
    const char* names[] = {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "Hello", " Hello", "\n", "no such token xyz"};
    for (int i = 0; i < 8; i++) printf("find %d\n", tokenizer_find(t, names[i]));
    int ids[] = {-1, 0, 198, 151645, 151668, 151669, 151935, 1 << 30};
    for (int i = 0; i < 8; i++) {
        size_t len;
        const char* piece = tokenizer_piece(t, ids[i], &len);
        printf("piece %d %zu %s\n", ids[i], len, piece ? "ok" : "null");
    }
    return 0;
}

int main(int argc, char** argv) {
    if (argc == 3 && strcmp(argv[1], "stream") == 0) return run_stream(atoi(argv[2]));
    if (argc < 3) { fprintf(stderr, "usage: see the top of tests/test_tokenizer.c\n"); return 2; }
    Tokenizer t;
    tokenizer_load(&t, argv[2]);
    int status = 2;
    if (strcmp(argv[1], "load") == 0) status = 0;
    else if (strcmp(argv[1], "goldens") == 0 && argc == 4) status = run_goldens(&t, argv[3]);
    else if (strcmp(argv[1], "encode") == 0) status = run_encode(&t);
    else if (strcmp(argv[1], "speed") == 0 && argc == 4) status = run_speed(&t, argv[3]);
    else if (strcmp(argv[1], "decode") == 0) status = run_decode(&t);
    else if (strcmp(argv[1], "info") == 0) status = run_info(&t);
    tokenizer_free(&t);
    return status;
}
