/* Inference for Qwen3 (and Qwen2/Qwen2.5) dense models in pure C, with a CUDA path.

   make runcpu -> ./runcpu: the plain float32 CPU reference of the whole model.
   make run    -> ./run:    the same program with every layer on the GPU (kernels.h).

   ./run model.bin -i "Once upon a time"        generate       (see usage() for all flags)
   ./run model.bin -m chat                      chat with Qwen3's template
   ./run model.bin -m ppl -f text.txt -c 2048   perplexity
   ./run -m tokenize -f text.txt                token ids of a file
   ./run model.bin -m logits -f ids.txt -o out  float32 logits of every position; -n N greedy more */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef USE_CUDA
#include <cuda_runtime_api.h>
#include "kernels.h"
#endif
#include "tokenizer.h"

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void* xmalloc(size_t n, const char* what) {
    void* p = calloc(1, n ? n : 1);
    if (!p) die("out of memory allocating %zu MB for %s", n >> 20, what);
    return p;
}

static void* xrealloc(void* p, size_t n, const char* what) {
    p = realloc(p, n);
    if (!p) die("out of memory allocating %zu MB for %s", n >> 20, what);
    return p;
}

static const char* plural(long n) { return n == 1 ? "" : "s"; }  // "1 token", "2 tokens"

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// ----------------------------------------------------------------------------
// The checkpoint: a 256-byte header, then the tensors in a fixed order, each 256-byte aligned
// (README.md has the table). Norm weights, biases and k_scale are float32 in every file.

#define MAGIC 0x334E5751u  // "QWN3"
#define VERSION 2  // 2 adds int8 weights; files of the other dtypes are version 1, as before
#define HEADER_BYTES 256
#define ALIGN 256
#define Q8_BLOCK 32  // int8 weights: one fp16 scale per 32 consecutive weights of a row (GGUF's Q8_0)
enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_INT8 = 3 };
static const char* const WDTYPE_NAMES[] = {"fp32", "bf16", "fp16", "int8"};
enum { FLAG_TIED = 1, FLAG_QK_NORM = 2, FLAG_QKV_BIAS = 4 };

typedef struct {
    uint32_t magic, version;
    int32_t dim;         // model width
    int32_t hidden_dim;  // MLP width
    int32_t n_layers, n_heads, n_kv_heads, head_dim, vocab_size, max_seq_len;
    float rope_theta, eps;
    uint32_t wdtype;     // W_*: dtype of the matrices (the embedding and the projections)
    uint32_t flags;      // FLAG_*
    uint64_t file_size;  // bytes, the header included
} Config;

// Byte offsets of each tensor in the file; 0 for a tensor the model does not have. An int8 file
// follows each matrix with its scales: (rows, cols / Q8_BLOCK) fp16, the same leading shape.
typedef struct {
    size_t embedding;   // (vocab_size, dim)                wdtype
    size_t rms_att;     // (n_layers, dim)                  f32
    size_t rms_ffn;     // (n_layers, dim)                  f32
    size_t q_norm;      // (n_layers, head_dim)             f32   if FLAG_QK_NORM
    size_t k_norm;      // (n_layers, head_dim)             f32   if FLAG_QK_NORM
    size_t k_scale;     // (n_layers)                       f32   the cache holds k / k_scale
    size_t bqkv;        // (n_layers, qkv_dim)              f32   if FLAG_QKV_BIAS
    size_t wqkv;        // (n_layers, qkv_dim, dim)         wdtype: q rows, then k, then v
    size_t wo;          // (n_layers, dim, q_dim)           wdtype
    size_t w_gate_up;   // (n_layers, 2*hidden_dim, dim)    wdtype: gate rows, then up
    size_t w_down;      // (n_layers, dim, hidden_dim)      wdtype
    size_t rms_final;   // (dim)                            f32
    size_t lm_head;     // (vocab_size, dim)                wdtype; the embedding when tied
    size_t embedding_scales, wqkv_scales, wo_scales, w_gate_up_scales, w_down_scales, lm_head_scales;  // int8
    size_t end;         // file size
} Layout;

static size_t wbytes(const Config* c) { return c->wdtype == W_F32 ? 4 : c->wdtype == W_INT8 ? 1 : 2; }
static int q_dim(const Config* c) { return c->n_heads * c->head_dim; }
static int kv_dim(const Config* c) { return c->n_kv_heads * c->head_dim; }
static int qkv_dim(const Config* c) { return q_dim(c) + 2 * kv_dim(c); }

static size_t place(size_t* at, size_t bytes) {  // aligned offset for the next tensor
    size_t off = (*at + ALIGN - 1) / ALIGN * ALIGN;
    *at = off + bytes;
    return off;
}

// A matrix of `count` weights (the stacked layers' included), then for int8 its scales
static size_t place_matrix(size_t* at, const Config* c, size_t count, size_t* scales) {
    size_t off = place(at, count * wbytes(c));
    if (c->wdtype == W_INT8) *scales = place(at, count / Q8_BLOCK * 2);
    return off;
}

static Layout layout(const Config* c) {
    size_t L = c->n_layers, D = c->dim, H = c->hidden_dim, hd = c->head_dim;
    size_t at = HEADER_BYTES, V = c->vocab_size, qkv = qkv_dim(c);
    Layout o = {0};
    o.embedding = place_matrix(&at, c, V * D, &o.embedding_scales);
    o.rms_att = place(&at, L * D * 4);
    o.rms_ffn = place(&at, L * D * 4);
    if (c->flags & FLAG_QK_NORM) {
        o.q_norm = place(&at, L * hd * 4);
        o.k_norm = place(&at, L * hd * 4);
    }
    o.k_scale = place(&at, L * 4);
    if (c->flags & FLAG_QKV_BIAS) o.bqkv = place(&at, L * qkv * 4);
    o.wqkv = place_matrix(&at, c, L * qkv * D, &o.wqkv_scales);
    o.wo = place_matrix(&at, c, L * D * q_dim(c), &o.wo_scales);
    o.w_gate_up = place_matrix(&at, c, L * 2 * H * D, &o.w_gate_up_scales);
    o.w_down = place_matrix(&at, c, L * D * H, &o.w_down_scales);
    o.rms_final = place(&at, D * 4);
    if (c->flags & FLAG_TIED) {
        o.lm_head = o.embedding;
        o.lm_head_scales = o.embedding_scales;
    } else {
        o.lm_head = place_matrix(&at, c, V * D, &o.lm_head_scales);
    }
    o.end = (at + ALIGN - 1) / ALIGN * ALIGN;
    return o;
}

static void check_config(const Config* c, const char* path, size_t actual_size) {
    if (c->magic != MAGIC) die("%s: not a model file (bad magic)", path);
    if (c->version < 1 || c->version > VERSION) die("%s: unsupported version %u (expected 1 to %d)", path, c->version, VERSION);
#define RANGE(field, lo, hi) if (c->field < (lo) || c->field > (hi)) \
        die("%s: %s = %d is out of range [%d, %d]", path, #field, (int)c->field, (int)(lo), (int)(hi))
    RANGE(dim, 1, 65536); RANGE(hidden_dim, 1, 1 << 20); RANGE(n_layers, 1, 1024);
    RANGE(n_heads, 1, 1024); RANGE(n_kv_heads, 1, 1024); RANGE(head_dim, 2, 1024);
    RANGE(vocab_size, 1, 1 << 22); RANGE(max_seq_len, 1, 1 << 24);
#undef RANGE
    if (c->n_heads % c->n_kv_heads) die("%s: n_heads %d is not a multiple of n_kv_heads %d", path, c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2) die("%s: head_dim %d is odd", path, c->head_dim);
    if (!(c->rope_theta > 0 && c->rope_theta < 1e30f)) die("%s: rope_theta %g is out of range", path, c->rope_theta);
    if (!(c->eps > 0 && c->eps < 1)) die("%s: rms_norm_eps %g is out of range", path, c->eps);
    if (c->wdtype > W_INT8) die("%s: unknown weight dtype %u", path, c->wdtype);
    if (c->wdtype == W_INT8 && c->version < 2) die("%s: int8 weights need format version 2, the file says %u", path, c->version);
    // int8: a row is whole blocks of Q8_BLOCK weights (rows of dim, q_dim and hidden_dim columns)
    if (c->wdtype == W_INT8 && (c->dim % Q8_BLOCK || c->hidden_dim % Q8_BLOCK || q_dim(c) % Q8_BLOCK))
        die("%s: int8 weights need dim, hidden_dim and n_heads * head_dim to be multiples of %d (%d, %d, %d)",
            path, Q8_BLOCK, c->dim, c->hidden_dim, q_dim(c));
    if (c->flags & ~7u) die("%s: unknown flags 0x%x", path, c->flags);
    Layout o = layout(c);
    if (c->file_size != o.end) die("%s: header says %llu bytes but the shapes need %zu", path, (unsigned long long)c->file_size, o.end);
    if (actual_size != o.end) die("%s: file has %zu bytes but the header needs %zu (truncated or wrong file?)", path, actual_size, o.end);
}

// The cache holds k / k_scale and the attention multiplies its scores by k_scale: only a power of two
// >= 1 leaves the math exact (and the cache finite).
static void check_k_scale(const float* k_scale, int n_layers, const char* path) {
    for (int l = 0; l < n_layers; l++) {
        int exponent;
        if (!(isfinite(k_scale[l]) && k_scale[l] >= 1 && frexpf(k_scale[l], &exponent) == 0.5f))
            die("%s: layer %d's k_scale %g is not a power of two >= 1", path, l, k_scale[l]);
    }
}

#ifdef USE_CUDA
// The shapes the GPU kernels take, checked once at load, before anything is uploaded (the launchers
// in the .cu files check them again, too late to name the field).
static void check_gpu_shapes(const Config* c, const char* path) {
    // decode attention, fused or not, is compiled for these head sizes (attention.cu, DISPATCH_HD);
    // prefill attention's (even, <= 256: 8 dims per lane of one warp) contains them
    int hd = c->head_dim;
    if (hd != 8 && hd != 16 && hd != 32 && hd != 64 && hd != 128)
        die("%s: head_dim %d: the GPU attention kernels take 8, 16, 32, 64 or 128", path, hd);
    // the prefill matrix products (matmul.cu) read 16-byte chunks of 8 weights, each wholly inside a
    // row, and store output rows in pairs: rows and columns are multiples of 8. Their matrices are
    // (qkv_dim, dim), (dim, q_dim), (2 hidden_dim, dim), (dim, hidden_dim) and (vocab_size, dim); q_dim
    // and kv_dim are multiples of head_dim. SwiGLU's 16-byte loads need hidden_dim % 4 (matmul.cu): implied.
    if (c->dim % 8) die("%s: dim %d: the GPU matrix products need a multiple of 8", path, c->dim);
    if (c->hidden_dim % 8) die("%s: hidden_dim %d: the GPU matrix products need a multiple of 8", path, c->hidden_dim);
    if (c->vocab_size % 8) die("%s: vocab_size %d: the GPU matrix products need a multiple of 8", path, c->vocab_size);
}
#endif

// ----------------------------------------------------------------------------
// The model as the CPU reference sees it: the vectors as float32, the matrices in the file's dtype,
// both read in place from the mapped checkpoint.

typedef struct {
    const void* embedding;  // (vocab_size, dim)
    float* rms_att;         // (n_layers, dim)
    float* rms_ffn;         // (n_layers, dim)
    float* q_norm;          // (n_layers, head_dim) or NULL
    float* k_norm;          // (n_layers, head_dim) or NULL
    float* k_scale;         // (n_layers)
    float* bqkv;            // (n_layers, qkv_dim) or NULL
    const void* wqkv;       // (n_layers, qkv_dim, dim)
    const void* wo;         // (n_layers, dim, q_dim)
    const void* w_gate_up;  // (n_layers, 2*hidden_dim, dim)
    const void* w_down;     // (n_layers, dim, hidden_dim)
    float* rms_final;       // (dim)
    const void* lm_head;    // (vocab_size, dim)
    // int8: the scales of each matrix, (.., rows, cols / Q8_BLOCK) fp16 bits; NULL otherwise
    const uint16_t *embedding_scales, *wqkv_scales, *wo_scales, *w_gate_up_scales, *w_down_scales, *lm_head_scales;
    int wdtype;
    float* half_to_f32;     // (65536) bf16 or fp16 bits -> float32: 16-bit weights, int8's fp16 scales
} Weights;

typedef struct {
    float* x;            // (dim) residual stream
    float* xb;           // (dim) normed input of a sublayer
    float* xb2;          // (dim) output of a sublayer
    float* qkv;          // (qkv_dim) q, k, v of the current token
    float* att;          // (q_dim) attention output, heads concatenated
    float* scores;       // (n_heads, seq_len)
    float* hb;           // (2*hidden_dim) gate, then up
    float* logits;       // (vocab_size)
    float* key_cache;    // (n_layers, seq_len, kv_dim), holds k / k_scale
    float* value_cache;  // (n_layers, seq_len, kv_dim)
} RunState;

typedef struct {
    Config config;
    Layout at;
    uint8_t* file;  // the mapped checkpoint
    size_t file_size;
    int seq_len;    // context length of the caches
    int use_k_scale;
    int need_logits;  // the caller reads the logits (else only their argmax, next_greedy)
    int next_greedy;  // argmax of the last logits
    Weights w;
    RunState s;
#ifdef USE_CUDA
    struct Gpu* gpu;
#endif
} Model;

static void load_checkpoint(Model* m, const char* path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    if ((size_t)st.st_size < HEADER_BYTES) die("%s: file has %lld bytes, too small for the header", path, (long long)st.st_size);
    m->file_size = st.st_size;
    m->file = mmap(NULL, m->file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m->file == MAP_FAILED) die("%s: mmap failed: %s", path, strerror(errno));
    memcpy(&m->config, m->file, sizeof(Config));
    check_config(&m->config, path, m->file_size);
    m->at = layout(&m->config);
    check_k_scale((const float*)(m->file + m->at.k_scale), m->config.n_layers, path);
#ifdef USE_CUDA
    check_gpu_shapes(&m->config, path);
#endif
}

static int argmax(const float* v, int n) {  // the lowest index on ties, as torch.argmax
    int best = 0;
    for (int i = 1; i < n; i++) if (v[i] > v[best]) best = i;
    return best;
}

static int all_finite(const float* v, size_t n) {
    for (size_t i = 0; i < n; i++) if (!isfinite(v[i])) return 0;
    return 1;
}

// NaN or inf logits have no argmax and no distribution to sample: stop rather than emit garbage.
static void die_not_finite(int pos) {
    die("the logits at position %d are not finite (NaN or inf): the checkpoint holds NaN or inf, "
        "or an activation overflowed", pos);
}

#ifndef USE_CUDA  // the CPU reference: runcpu only
static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, mant = h & 1023, u;
    if (e == 31) u = sign | 0x7F800000u | (mant << 13);  // inf, nan
    else if (e) u = sign | ((e + 112) << 23) | (mant << 13);
    else if (mant) {  // subnormal: normalise
        e = 113;
        while (!(mant & 1024)) { mant <<= 1; e--; }
        u = sign | (e << 23) | ((mant & 1023) << 13);
    } else u = sign;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float* vector_f32(Model* m, size_t offset) { return offset ? (float*)(m->file + offset) : NULL; }

static void init_cpu(Model* m) {
    Config* c = &m->config;
    Layout* o = &m->at;
    Weights* w = &m->w;
    size_t L = c->n_layers, D = c->dim, H = c->hidden_dim, V = c->vocab_size;
    w->embedding = m->file + o->embedding;
    w->rms_att = vector_f32(m, o->rms_att);
    w->rms_ffn = vector_f32(m, o->rms_ffn);
    w->q_norm = vector_f32(m, o->q_norm);
    w->k_norm = vector_f32(m, o->k_norm);
    w->k_scale = vector_f32(m, o->k_scale);
    w->bqkv = vector_f32(m, o->bqkv);
    w->wqkv = m->file + o->wqkv;
    w->wo = m->file + o->wo;
    w->w_gate_up = m->file + o->w_gate_up;
    w->w_down = m->file + o->w_down;
    w->rms_final = vector_f32(m, o->rms_final);
    w->lm_head = m->file + o->lm_head;
    if (c->wdtype == W_INT8) {
        w->embedding_scales = (const uint16_t*)(m->file + o->embedding_scales);
        w->wqkv_scales = (const uint16_t*)(m->file + o->wqkv_scales);
        w->wo_scales = (const uint16_t*)(m->file + o->wo_scales);
        w->w_gate_up_scales = (const uint16_t*)(m->file + o->w_gate_up_scales);
        w->w_down_scales = (const uint16_t*)(m->file + o->w_down_scales);
        w->lm_head_scales = (const uint16_t*)(m->file + o->lm_head_scales);
    }
    w->wdtype = c->wdtype;
    if (c->wdtype != W_F32) {  // every 16-bit pattern's exact float32 value
        w->half_to_f32 = xmalloc(65536 * sizeof(float), "the weight dtype table");
        for (uint32_t h = 0; h < 65536; h++)  // int8: for the scales
            w->half_to_f32[h] = c->wdtype == W_BF16 ? bf16_to_f32((uint16_t)h) : f16_to_f32((uint16_t)h);
    }

    RunState* s = &m->s;
    size_t cache = L * m->seq_len * kv_dim(c);
    s->x = xmalloc(D * 4, "activations");
    s->xb = xmalloc(D * 4, "activations");
    s->xb2 = xmalloc(D * 4, "activations");
    s->qkv = xmalloc(qkv_dim(c) * 4, "activations");
    s->att = xmalloc(q_dim(c) * 4, "activations");
    s->scores = xmalloc((size_t)c->n_heads * m->seq_len * 4, "attention scores");
    s->hb = xmalloc(2 * H * 4, "activations");
    s->logits = xmalloc(V * 4, "logits");
    s->key_cache = xmalloc(cache * 4, "the key cache");
    s->value_cache = xmalloc(cache * 4, "the value cache");
}

// ----------------------------------------------------------------------------
// The CPU reference: each operation as plain loops, float32 with double sums.

static void rmsnorm(float* out, const float* x, const float* weight, int n, float eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float scale = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

// Element i of a weight matrix as float32 (exact for every stored dtype: an int8 value times its
// fp16 scale has at most 8 + 11 significant bits)
static inline float weight(const Weights* w, const void* mat, const uint16_t* scales, size_t i) {
    if (w->wdtype == W_INT8) return (float)((const int8_t*)mat)[i] * w->half_to_f32[scales[i / Q8_BLOCK]];
    return w->half_to_f32 ? w->half_to_f32[((const uint16_t*)mat)[i]] : ((const float*)mat)[i];
}

// out (d) = rows first_row .. first_row + d of the weight matrix mat (.., n) @ x (n) (scales: int8's);
// weight()'s dtype test is hoisted out of the inner loop. Each product is the float32 weight times
// x[j], summed in double in the same order for every dtype: int8 gives exactly what float32 gives
// on the dequantized matrix.
static void matmul(const Weights* w, float* out, const float* x, const void* mat, const uint16_t* scales,
                   size_t first_row, int n, int d) {
    int i;
#pragma omp parallel for private(i)
    for (i = 0; i < d; i++) {
        size_t at = (first_row + i) * n;
        double sum = 0;
        if (w->wdtype == W_INT8) {
            const int8_t* row = (const int8_t*)mat + at;
            const uint16_t* row_scales = scales + at / Q8_BLOCK;
            for (int b = 0; b < n / Q8_BLOCK; b++) {
                float scale = w->half_to_f32[row_scales[b]];
                for (int j = b * Q8_BLOCK; j < (b + 1) * Q8_BLOCK; j++) sum += (float)row[j] * scale * x[j];
            }
        } else if (w->half_to_f32) {
            const uint16_t* row = (const uint16_t*)mat + at;
            for (int j = 0; j < n; j++) sum += w->half_to_f32[row[j]] * x[j];
        } else {
            const float* row = (const float*)mat + at;
            for (int j = 0; j < n; j++) sum += row[j] * x[j];
        }
        out[i] = (float)sum;
    }
}

// NeoX rotate-half RoPE on n_heads vectors of head_dim, angles in float32 as transformers has them
static void rope(float* v, int n_heads, int head_dim, int pos, float theta) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
        float angle = (float)pos * inv_freq, c = cosf(angle), s = sinf(angle);
        for (int h = 0; h < n_heads; h++) {
            float* x = v + h * head_dim;
            float a = x[i], b = x[i + half];
            x[i] = a * c - b * s;
            x[i + half] = b * c + a * s;
        }
    }
}

static float silu(float z) { return z / (1.0f + expf(-z)); }

static float* forward_cpu(Model* m, int token, int pos) {
    Config* c = &m->config;
    Weights* w = &m->w;
    RunState* s = &m->s;
    int D = c->dim, H = c->hidden_dim, hd = c->head_dim, QKV = qkv_dim(c), KV = kv_dim(c);
    int group = c->n_heads / c->n_kv_heads;
    float* x = s->x;
    for (int i = 0; i < D; i++) x[i] = weight(w, w->embedding, w->embedding_scales, (size_t)token * D + i);

    for (int l = 0; l < c->n_layers; l++) {
        // q, k, v = Wqkv @ rmsnorm(x) (+ bias)
        rmsnorm(s->xb, x, w->rms_att + l * D, D, c->eps);
        matmul(w, s->qkv, s->xb, w->wqkv, w->wqkv_scales, (size_t)l * QKV, D, QKV);
        if (w->bqkv) for (int i = 0; i < QKV; i++) s->qkv[i] += w->bqkv[(size_t)l * QKV + i];
        float *q = s->qkv, *k = q + q_dim(c), *v = k + KV;
        // per-head RMSNorm of q and k (Qwen3), then RoPE
        if (w->q_norm) {
            for (int h = 0; h < c->n_heads; h++) rmsnorm(q + h * hd, q + h * hd, w->q_norm + l * hd, hd, c->eps);
            for (int h = 0; h < c->n_kv_heads; h++) rmsnorm(k + h * hd, k + h * hd, w->k_norm + l * hd, hd, c->eps);
        }
        rope(q, c->n_heads, hd, pos, c->rope_theta);
        rope(k, c->n_kv_heads, hd, pos, c->rope_theta);
        // cache k / k_scale and v at this position; k_scale is a power of two, so this is exact
        float k_scale = m->use_k_scale ? w->k_scale[l] : 1.0f;
        float* kc = s->key_cache + (size_t)l * m->seq_len * KV;
        float* vc = s->value_cache + (size_t)l * m->seq_len * KV;
        for (int i = 0; i < KV; i++) {
            kc[(size_t)pos * KV + i] = k[i] / k_scale;
            vc[(size_t)pos * KV + i] = v[i];
        }
        // causal GQA attention: query head h reads KV head h / group; softmax in float32
        float scale = k_scale / sqrtf((float)hd);
        int h;
#pragma omp parallel for private(h)
        for (h = 0; h < c->n_heads; h++) {
            const float* qh = q + h * hd;
            float* sc = s->scores + (size_t)h * m->seq_len;
            int kvh = h / group;
            float max = -INFINITY;
            for (int t = 0; t <= pos; t++) {
                const float* kt = kc + (size_t)t * KV + kvh * hd;
                double dot = 0;
                for (int i = 0; i < hd; i++) dot += qh[i] * kt[i];
                sc[t] = (float)dot * scale;
                if (sc[t] > max) max = sc[t];
            }
            double sum = 0;
            for (int t = 0; t <= pos; t++) { sc[t] = expf(sc[t] - max); sum += sc[t]; }
            float* out = s->att + h * hd;
            for (int i = 0; i < hd; i++) {
                double acc = 0;
                for (int t = 0; t <= pos; t++) acc += sc[t] * vc[(size_t)t * KV + kvh * hd + i];
                out[i] = (float)(acc / sum);
            }
        }
        // x += Wo @ att
        matmul(w, s->xb2, s->att, w->wo, w->wo_scales, (size_t)l * D, q_dim(c), D);
        for (int i = 0; i < D; i++) x[i] += s->xb2[i];
        // x += Wdown @ (silu(Wgate @ rmsnorm(x)) * (Wup @ rmsnorm(x)))
        rmsnorm(s->xb, x, w->rms_ffn + l * D, D, c->eps);
        matmul(w, s->hb, s->xb, w->w_gate_up, w->w_gate_up_scales, (size_t)l * 2 * H, D, 2 * H);
        for (int i = 0; i < H; i++) s->hb[i] = silu(s->hb[i]) * s->hb[H + i];
        matmul(w, s->xb2, s->hb, w->w_down, w->w_down_scales, (size_t)l * D, H, D);
        for (int i = 0; i < D; i++) x[i] += s->xb2[i];
    }
    // logits = lm_head @ rmsnorm(x)
    rmsnorm(s->xb, x, w->rms_final, D, c->eps);
    matmul(w, s->logits, s->xb, w->lm_head, w->lm_head_scales, 0, D, c->vocab_size);
    return s->logits;
}
#endif

// ----------------------------------------------------------------------------
// The GPU path: weights copied to the device as one block, every operation a kernel (kernels.h).

#ifdef USE_CUDA
// Tokens per batched prefill pass: it bounds the prefill buffers (~80 KB a token at Qwen3-0.6B's shape,
// ~235 KB at 8B's), and larger passes fill the GPU better (RESULTS.md: 4096 against 1024 tokens, 1.43x
// faster prefill of a 2048-token prompt). A build may set it (-DPREFILL_CHUNK=2048) to time others.
#ifndef PREFILL_CHUNK
#define PREFILL_CHUNK 4096
#endif
#define LM_CHUNK 128        // tokens per LM-head product when every position needs its logits

struct Gpu {
    uint8_t* weights;     // the file's bytes after the header, on the device
    void* key_cache;      // (n_layers, seq_len, kv_dim), kv_dtype
    void* value_cache;    // (n_layers, seq_len, kv_dim), kv_dtype
    int kv_dtype;
    int fused;            // decode: 1 the persistent kernel (decode.cu), 0 the chain of kernels
    int simple_matmul;    // prefill: 1 the simple tensor-core matrix products (-a 0), 0 the TMA ones
    int chunk;            // tokens per prefill pass: min(seq_len, PREFILL_CHUNK)
    cudaStream_t stream;
    // decode, one token
    float* x;             // (dim)
    float* xb;            // (dim)
    float* qkv;           // (qkv_dim)
    float* att;           // (q_dim)
    float* hb;            // (hidden_dim)
    float* logits;        // (vocab_size)
    float* scratch;       // attention partials
    int* io;              // (3) the token, its position, and the argmax of the logits
    int* host_io;         // (3) pinned copy of io: the graph reads and writes it
    cudaGraphExec_t step; // the chain: the whole decode step, captured once, replayed per token
    // the persistent kernel: greedy decoding enqueues step pos + 1 before it waits for step pos
    DecodeStep decode;    // its arguments (kernels.h)
    int* results;         // (2) host-mapped: the argmax of the steps in slots 0 and 1
    int* results_dev;     // the same memory, as the kernel sees it
    cudaEvent_t done[2];  // recorded after the step in each slot
    int next_slot;        // slot of the next step enqueued
    int ahead_pos;        // position of the step enqueued ahead (its token: the GPU's argmax), -1 none
    int ahead_slot;
    // prefill, up to PREFILL_CHUNK tokens; "act" is matmul_input_dtype(wdtype), what products read
    float* bx;            // (chunk, dim)
    void* bxb;            // (chunk, dim) act
    float* bqkv;          // (chunk, qkv_dim) where QK-norm and RoPE are not fused into the product
    void* bq;             // (chunk, q_dim) of the cache's dtype: the queries, normed and rotated
    float* brope;         // (chunk, head_dim / 2, 2) RoPE's cos and sin at the chunk's positions
    void* batt;           // (chunk, q_dim) act
    float* bgate_up;      // (chunk, 2*hidden_dim) where SwiGLU is not fused into the product
    void* bh;             // (chunk, hidden_dim) act
    float* blogits;       // (LM_CHUNK, vocab_size)
    float* bloss;         // the LM head's loss partials (lm_head_loss_gpu)
    float* bnll;          // (chunk) -log p(target) per position
    int* bids;            // (2, chunk) token ids, then targets
};

static void* gpu_alloc(size_t bytes, const char* what) {
    void* p;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) die("GPU: cannot allocate %zu MB for %s: %s", bytes >> 20, what, cudaGetErrorString(e));
    return p;
}

// Without a usable GPU every CUDA call would fail: say so once, before anything goes to the GPU.
static void require_gpu(void) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0)
        die("no CUDA GPU (%s): ./run needs an NVIDIA GPU; ./runcpu runs on the CPU",
            e != cudaSuccess ? cudaGetErrorString(e) : "none found");
}

static void init_decode(Model* m);

static void init_gpu(Model* m, int kv_dtype, int fused) {
    Config* c = &m->config;
    struct Gpu* g = m->gpu = xmalloc(sizeof(struct Gpu), "GPU state");
    size_t cache = (size_t)c->n_layers * m->seq_len * kv_dim(c) * 2, D = c->dim, H = c->hidden_dim;
    size_t chunk = g->chunk = m->seq_len < PREFILL_CHUNK ? m->seq_len : PREFILL_CHUNK;
    g->kv_dtype = kv_dtype;
    g->fused = fused;
    g->simple_matmul = !fused;
    CUDA_CHECK(cudaStreamCreate(&g->stream));
    g->weights = gpu_alloc(m->file_size - HEADER_BYTES, "the weights");
    CUDA_CHECK(cudaMemcpy(g->weights, m->file + HEADER_BYTES, m->file_size - HEADER_BYTES, cudaMemcpyHostToDevice));
    g->key_cache = gpu_alloc(cache, "the key cache");
    g->value_cache = gpu_alloc(cache, "the value cache");
    g->x = gpu_alloc(D * 4, "activations");
    g->xb = gpu_alloc(D * 4, "activations");
    g->qkv = gpu_alloc(qkv_dim(c) * 4, "activations");
    g->att = gpu_alloc(q_dim(c) * 4, "activations");
    g->hb = gpu_alloc(H * 4, "activations");
    g->logits = gpu_alloc((size_t)c->vocab_size * 4, "logits");
    g->scratch = gpu_alloc(attention_scratch_floats(c->n_heads, c->head_dim, m->seq_len) * 4, "attention scratch");
    g->io = gpu_alloc(3 * sizeof(int), "token");
    CUDA_CHECK(cudaMallocHost((void**)&g->host_io, 3 * sizeof(int)));
    g->bx = gpu_alloc(chunk * D * 4, "prefill activations");
    g->bxb = gpu_alloc(chunk * D * 4, "prefill activations");
    g->bqkv = gpu_alloc(chunk * qkv_dim(c) * 4, "prefill activations");
    g->bq = gpu_alloc(chunk * q_dim(c) * 2, "prefill activations");
    g->brope = gpu_alloc(chunk * c->head_dim * 4, "prefill activations");
    g->batt = gpu_alloc(chunk * q_dim(c) * 4, "prefill activations");
    g->bgate_up = gpu_alloc(chunk * 2 * H * 4, "prefill activations");
    g->bh = gpu_alloc(chunk * H * 4, "prefill activations");
    g->blogits = gpu_alloc((size_t)LM_CHUNK * c->vocab_size * 4, "prefill logits");
    g->bloss = gpu_alloc(lm_head_loss_scratch_floats((int)chunk, c->vocab_size) * 4, "prefill losses");
    g->bnll = gpu_alloc(chunk * 4, "prefill losses");
    g->bids = gpu_alloc(2 * chunk * sizeof(int), "prefill token ids");
    m->s.logits = xmalloc((size_t)c->vocab_size * 4, "logits");
    if (g->fused) init_decode(m);
    size_t free_bytes, total_bytes;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    fprintf(stderr, "[GPU memory in use: %zu MB of %zu MB]\n", (total_bytes - free_bytes) >> 20, total_bytes >> 20);
}

// One layer's weights and caches on the device.
typedef struct {
    const float *rms_att, *rms_ffn, *bqkv, *q_norm, *k_norm;  // bqkv, q_norm, k_norm may be NULL
    const void *wqkv, *wo, *w_gate_up, *w_down;
    const void *wqkv_scales, *wo_scales, *w_gate_up_scales, *w_down_scales;  // int8; else NULL
    float k_scale;
    void *k_cache, *v_cache;
} LayerGpu;

static const void* on_gpu(const Model* m, size_t offset) { return offset ? m->gpu->weights + offset - HEADER_BYTES : NULL; }

// int8: the scales of the weights from index `first` on of a stacked matrix (2 bytes per Q8_BLOCK
// weights); NULL for the other dtypes
static const void* layer_scales(const Model* m, size_t offset, size_t first) {
    return offset ? (const uint8_t*)on_gpu(m, offset) + first / Q8_BLOCK * 2 : NULL;
}

static LayerGpu layer_gpu(const Model* m, int l) {
    const Config* c = &m->config;
    const Layout* o = &m->at;
    size_t D = c->dim, H = c->hidden_dim, hd = c->head_dim, QKV = qkv_dim(c), wb = wbytes(c);
    size_t cache = (size_t)l * m->seq_len * kv_dim(c) * 2;
    LayerGpu w;
    w.rms_att = (const float*)on_gpu(m, o->rms_att) + l * D;
    w.rms_ffn = (const float*)on_gpu(m, o->rms_ffn) + l * D;
    w.bqkv = o->bqkv ? (const float*)on_gpu(m, o->bqkv) + l * QKV : NULL;
    w.q_norm = o->q_norm ? (const float*)on_gpu(m, o->q_norm) + l * hd : NULL;
    w.k_norm = o->k_norm ? (const float*)on_gpu(m, o->k_norm) + l * hd : NULL;
    w.wqkv = (const uint8_t*)on_gpu(m, o->wqkv) + l * QKV * D * wb;
    w.wo = (const uint8_t*)on_gpu(m, o->wo) + l * D * q_dim(c) * wb;
    w.w_gate_up = (const uint8_t*)on_gpu(m, o->w_gate_up) + l * 2 * H * D * wb;
    w.w_down = (const uint8_t*)on_gpu(m, o->w_down) + l * D * H * wb;
    w.wqkv_scales = layer_scales(m, o->wqkv_scales, l * QKV * D);
    w.wo_scales = layer_scales(m, o->wo_scales, l * D * q_dim(c));
    w.w_gate_up_scales = layer_scales(m, o->w_gate_up_scales, l * 2 * H * D);
    w.w_down_scales = layer_scales(m, o->w_down_scales, l * D * H);
    w.k_scale = m->use_k_scale ? ((const float*)(m->file + o->k_scale))[l] : 1.0f;
    w.k_cache = (uint8_t*)m->gpu->key_cache + cache;
    w.v_cache = (uint8_t*)m->gpu->value_cache + cache;
    return w;
}

// The persistent decode kernel's arguments: the stacked tensors, the caches and the decode buffers.
// A shape whose rows do not fit its shared memory runs on the chain instead.
static void init_decode(Model* m) {
    Config* c = &m->config;
    struct Gpu* g = m->gpu;
    const Layout* o = &m->at;
    g->decode = (DecodeStep){
        .embedding = on_gpu(m, o->embedding), .rms_att = on_gpu(m, o->rms_att), .rms_ffn = on_gpu(m, o->rms_ffn),
        .q_norm = on_gpu(m, o->q_norm), .k_norm = on_gpu(m, o->k_norm),
        .k_scale = m->use_k_scale ? on_gpu(m, o->k_scale) : NULL, .bqkv = on_gpu(m, o->bqkv),
        .wqkv = on_gpu(m, o->wqkv), .wo = on_gpu(m, o->wo), .w_gate_up = on_gpu(m, o->w_gate_up),
        .w_down = on_gpu(m, o->w_down), .rms_final = on_gpu(m, o->rms_final), .lm_head = on_gpu(m, o->lm_head),
        .embedding_scales = on_gpu(m, o->embedding_scales), .wqkv_scales = on_gpu(m, o->wqkv_scales),
        .wo_scales = on_gpu(m, o->wo_scales), .w_gate_up_scales = on_gpu(m, o->w_gate_up_scales),
        .w_down_scales = on_gpu(m, o->w_down_scales), .lm_head_scales = on_gpu(m, o->lm_head_scales),
        .k_cache = g->key_cache, .v_cache = g->value_cache, .logits = g->logits, .io = g->io,
        .dim = c->dim, .hidden_dim = c->hidden_dim, .n_layers = c->n_layers, .n_heads = c->n_heads,
        .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim, .vocab_size = c->vocab_size, .seq_len = m->seq_len,
        .wdtype = c->wdtype, .kv_dtype = g->kv_dtype, .theta = c->rope_theta, .eps = c->eps};
    if (decode_step_stage_bytes(&g->decode) == 0) {
        fprintf(stderr, "[decode: this shape's rows do not fit the persistent kernel's shared memory; "
                "running the chain of kernels (-a 0)]\n");
        g->fused = 0;
        return;
    }
    size_t words = decode_published_words(&g->decode);
    g->decode.published = gpu_alloc(words * sizeof(unsigned long long), "decode activations");
    CUDA_CHECK(cudaMemset(g->decode.published, 0, words * sizeof(unsigned long long)));
    g->decode.blocks_done = gpu_alloc(sizeof(unsigned), "decode counter");
    CUDA_CHECK(cudaMemset(g->decode.blocks_done, 0, sizeof(unsigned)));
    CUDA_CHECK(cudaHostAlloc((void**)&g->results, 2 * sizeof(int), cudaHostAllocMapped));
    CUDA_CHECK(cudaHostGetDevicePointer((void**)&g->results_dev, g->results, 0));
    for (int i = 0; i < 2; i++) CUDA_CHECK(cudaEventCreateWithFlags(&g->done[i], cudaEventDisableTiming));
    g->ahead_pos = -1;
}

// Enqueues one step of the persistent kernel (token < 0: the argmax of the step before, on the GPU,
// at its position + 1), and the copy of its logits when the caller reads them. Returns its slot.
static int enqueue_decode(Model* m, int token, int pos) {
    struct Gpu* g = m->gpu;
    int slot = g->next_slot;
    g->next_slot ^= 1;
    decode_step_gpu(&g->decode, token, pos, g->results_dev + slot, g->stream);
    if (m->need_logits)
        CUDA_CHECK(cudaMemcpyAsync(m->s.logits, g->logits, (size_t)m->config.vocab_size * 4, cudaMemcpyDeviceToHost, g->stream));
    CUDA_CHECK(cudaEventRecord(g->done[slot], g->stream));
    return slot;
}

// Enqueues one decode step of the chain: token and position come from host_io, the argmax goes back to it.
static void enqueue_step(Model* m) {
    Config* c = &m->config;
    struct Gpu* g = m->gpu;
    cudaStream_t st = g->stream;
    int D = c->dim, H = c->hidden_dim, hd = c->head_dim, QKV = qkv_dim(c), wt = c->wdtype;
    const int* pos = g->io + 1;
    CUDA_CHECK(cudaMemcpyAsync(g->io, g->host_io, 2 * sizeof(int), cudaMemcpyHostToDevice, st));
    embed_gpu(g->x, on_gpu(m, m->at.embedding), on_gpu(m, m->at.embedding_scales), wt, g->io, 1, D, st);
    for (int l = 0; l < c->n_layers; l++) {
        LayerGpu w = layer_gpu(m, l);
        // x += o_proj(attention(rope(qk_norm(qkv(rmsnorm(x))))))
        float *q = g->qkv, *k = q + q_dim(c), *v = k + kv_dim(c);
        rmsnorm_gpu(g->xb, DT_F32, g->x, w.rms_att, 1, D, c->eps, st);
        matvec_gpu(g->qkv, w.wqkv, w.wqkv_scales, wt, g->xb, w.bqkv, QKV, D, 0, st);
        qk_norm_rope_gpu(q, k, v, w.q_norm, w.k_norm, w.k_scale, w.k_cache, w.v_cache, g->kv_dtype, pos,
                         c->n_heads, c->n_kv_heads, hd, c->rope_theta, c->eps, st);
        attention_gpu(g->att, q, w.k_cache, w.v_cache, g->kv_dtype, pos, c->n_heads, c->n_kv_heads, hd,
                      m->seq_len, w.k_scale / sqrtf((float)hd), g->scratch, st);
        matvec_gpu(g->x, w.wo, w.wo_scales, wt, g->att, NULL, D, q_dim(c), 1, st);
        // x += Wdown @ (silu(Wgate @ rmsnorm(x)) * (Wup @ rmsnorm(x)))
        rmsnorm_gpu(g->xb, DT_F32, g->x, w.rms_ffn, 1, D, c->eps, st);
        swiglu_matvec_gpu(g->hb, w.w_gate_up, w.w_gate_up_scales, wt, g->xb, H, D, st);
        matvec_gpu(g->x, w.w_down, w.w_down_scales, wt, g->hb, NULL, D, H, 1, st);
    }
    // logits = lm_head @ rmsnorm(x), and their argmax
    rmsnorm_gpu(g->xb, DT_F32, g->x, on_gpu(m, m->at.rms_final), 1, D, c->eps, st);
    matvec_gpu(g->logits, on_gpu(m, m->at.lm_head), on_gpu(m, m->at.lm_head_scales), wt, g->xb, NULL, c->vocab_size,
               D, 0, st);
    argmax_gpu(g->io + 2, g->logits, c->vocab_size, st);
    CUDA_CHECK(cudaMemcpyAsync(g->host_io + 2, g->io + 2, sizeof(int), cudaMemcpyDeviceToHost, st));
}

// The last position's logits (when the caller reads them) and their argmax, to the host. The argmax
// is -1 when a logit is NaN or inf (argmax_gpu).
static float* finish_gpu(Model* m) {
    struct Gpu* g = m->gpu;
    if (m->need_logits)
        CUDA_CHECK(cudaMemcpyAsync(m->s.logits, g->logits, (size_t)m->config.vocab_size * 4, cudaMemcpyDeviceToHost, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    m->next_greedy = g->host_io[2];
    return m->s.logits;
}

// One decode step. The persistent kernel: when the caller only reads the argmax (greedy), step
// pos + 1 is enqueued, with the GPU's argmax as its token, before the host waits for step pos, so
// the GPU never waits for the host; the next call finds it running. (A caller that then feeds
// another token at pos + 1 supersedes it: it wrote only cache row pos + 1, which the new step
// rewrites.) The chain: its captured graph, ~250 kernels launched as one.
static float* forward_gpu(Model* m, int token, int pos) {
    struct Gpu* g = m->gpu;
    if (g->fused) {
        int slot = g->ahead_pos == pos && token == m->next_greedy ? g->ahead_slot : enqueue_decode(m, token, pos);
        g->ahead_pos = -1;
        if (!m->need_logits && pos + 1 < m->seq_len) {
            g->ahead_slot = enqueue_decode(m, -1, pos + 1);
            g->ahead_pos = pos + 1;
        }
        CUDA_CHECK(cudaEventSynchronize(g->done[slot]));
        m->next_greedy = g->results[slot];
        if (m->next_greedy < 0) die_not_finite(pos);
        return m->s.logits;
    }
    if (!g->step) {
        cudaGraph_t graph;
        CUDA_CHECK(cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeThreadLocal));
        enqueue_step(m);
        CUDA_CHECK(cudaStreamEndCapture(g->stream, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&g->step, graph, 0));
        CUDA_CHECK(cudaGraphDestroy(graph));
    }
    g->host_io[0] = token;
    g->host_io[1] = pos;
    CUDA_CHECK(cudaGraphLaunch(g->step, g->stream));
    float* logits = finish_gpu(m);
    if (m->next_greedy < 0) die_not_finite(pos);
    return logits;
}

// Prefill: n <= PREFILL_CHUNK tokens at positions pos.. in one pass, every product a matrix product
// on the tensor cores (kernels.h). The last position's logits go where forward_gpu puts them; with
// all_logits (host, (n, vocab)) every position's logits are copied there; with targets (n), returns
// the sum over positions t of -log p(targets[t]).
static double forward_batch_gpu(Model* m, const int* ids, int n, int pos, float* all_logits, const int* targets) {
    Config* c = &m->config;
    struct Gpu* g = m->gpu;
    cudaStream_t st = g->stream;
    int D = c->dim, H = c->hidden_dim, hd = c->head_dim, V = c->vocab_size, wt = c->wdtype;
    int chunk = g->chunk, act = matmul_input_dtype(wt);
    size_t act_size = act == DT_F32 ? 4 : 2;
    void (*product)(float*, const void*, const void*, int, const void*, const float*, int, int, int, int, cudaStream_t) =
        g->simple_matmul ? matmul_simple_gpu : matmul_gpu;
    const void *lm_head = on_gpu(m, m->at.lm_head), *lm_head_scales = on_gpu(m, m->at.lm_head_scales);
    g->ahead_pos = -1;  // a decode step enqueued ahead is superseded: its cache row is rewritten here
    CUDA_CHECK(cudaMemcpyAsync(g->bids, ids, n * sizeof(int), cudaMemcpyHostToDevice, st));
    if (targets) CUDA_CHECK(cudaMemcpyAsync(g->bids + chunk, targets, n * sizeof(int), cudaMemcpyHostToDevice, st));
    embed_gpu(g->bx, on_gpu(m, m->at.embedding), on_gpu(m, m->at.embedding_scales), wt, g->bids, n, D, st);
    rope_table_gpu(g->brope, pos, n, hd, c->rope_theta, st);  // the same rotations in every layer
    for (int l = 0; l < c->n_layers; l++) {
        LayerGpu w = layer_gpu(m, l);
        // x += o_proj(attention(rope(qk_norm(qkv(rmsnorm(x)))))); k and v go to the cache rows pos..
        rmsnorm_gpu(g->bxb, act, g->bx, w.rms_att, n, D, c->eps, st);
        qkv_rope_matmul_gpu(g->bq, w.wqkv, w.wqkv_scales, wt, g->bxb, w.bqkv, w.q_norm, w.k_norm, w.k_scale,
                            w.k_cache, w.v_cache, g->kv_dtype, g->brope, pos, n, c->n_heads, c->n_kv_heads, hd, D,
                            c->rope_theta, c->eps, g->bqkv, g->simple_matmul, st);
        attention_prefill_gpu(g->batt, act, g->bq, w.k_cache, w.v_cache, g->kv_dtype, pos, n, c->n_heads,
                              c->n_kv_heads, hd, w.k_scale / sqrtf((float)hd), st);
        product(g->bx, w.wo, w.wo_scales, wt, g->batt, NULL, n, D, q_dim(c), 1, st);
        // x += Wdown @ (silu(Wgate @ rmsnorm(x)) * (Wup @ rmsnorm(x)))
        rmsnorm_gpu(g->bxb, act, g->bx, w.rms_ffn, n, D, c->eps, st);
        swiglu_matmul_gpu(g->bh, w.w_gate_up, w.w_gate_up_scales, wt, g->bxb, n, H, D, g->bgate_up,
                          g->simple_matmul, st);
        product(g->bx, w.w_down, w.w_down_scales, wt, g->bh, NULL, n, D, H, 1, st);
    }
    rmsnorm_gpu(g->bxb, act, g->bx, on_gpu(m, m->at.rms_final), n, D, c->eps, st);
    // perplexity: -log p(target) of every position, straight from the LM head's tiles (fp32 weights
    // have no tensor-core path: their logits go through memory below)
    int fused_loss = targets && wt != DT_F32;
    if (fused_loss)
        lm_head_loss_gpu(g->bnll, lm_head, lm_head_scales, wt, g->bxb, g->bids + chunk, n, V, D, g->bloss,
                         g->simple_matmul, st);
    for (int t = 0; (all_logits || (targets && !fused_loss)) && t < n; t += LM_CHUNK) {  // logits of every position
        int k = n - t < LM_CHUNK ? n - t : LM_CHUNK;
        product(g->blogits, lm_head, lm_head_scales, wt, (uint8_t*)g->bxb + (size_t)t * D * act_size, NULL, k, V, D, 0, st);
        if (targets && !fused_loss) cross_entropy_gpu(g->bnll + t, g->blogits, g->bids + chunk + t, k, V, st);
        if (all_logits)
            CUDA_CHECK(cudaMemcpyAsync(all_logits + (size_t)t * V, g->blogits, (size_t)k * V * 4, cudaMemcpyDeviceToHost, st));
    }
    // the last position's logits and argmax, as a decode step leaves them (from the fp32 normed x)
    rmsnorm_gpu(g->xb, DT_F32, g->bx + (size_t)(n - 1) * D, on_gpu(m, m->at.rms_final), 1, D, c->eps, st);
    matvec_gpu(g->logits, lm_head, lm_head_scales, wt, g->xb, NULL, V, D, 0, st);
    argmax_gpu(g->io + 2, g->logits, V, st);
    CUDA_CHECK(cudaMemcpyAsync(g->host_io + 2, g->io + 2, sizeof(int), cudaMemcpyDeviceToHost, st));
    float* nll = targets ? xmalloc(n * sizeof(float), "losses") : NULL;
    if (targets) CUDA_CHECK(cudaMemcpyAsync(nll, g->bnll, n * sizeof(float), cudaMemcpyDeviceToHost, st));
    finish_gpu(m);
    double sum = 0;
    for (int t = 0; t < n; t++) {  // NaN or inf in what the caller reads: the first position that has them
        if ((all_logits && !all_finite(all_logits + (size_t)t * V, V)) || (targets && !isfinite(nll[t])) ||
            (t == n - 1 && m->next_greedy < 0))
            die_not_finite(pos + t);
        if (targets) sum += nll[t];
    }
    free(nll);
    return sum;
}
#endif

// Token ids index the embedding and the logits: an id from a tokenizer that is not the model's, or a
// bad ids file, stops here.
static void check_id(const Model* m, int id, long pos) {
    if (id < 0 || id >= m->config.vocab_size)
        die("token id %d at position %ld is outside the model's vocabulary [0, %d)", id, pos, m->config.vocab_size);
}

static float* forward(Model* m, int token, int pos) {
    check_id(m, token, pos);
    if (pos >= m->seq_len) die("position %d is past the context length %d", pos, m->seq_len);
#ifdef USE_CUDA
    return forward_gpu(m, token, pos);
#else
    float* logits = forward_cpu(m, token, pos);
    if (!all_finite(logits, m->config.vocab_size)) die_not_finite(pos);
    m->next_greedy = argmax(logits, m->config.vocab_size);
    return logits;
#endif
}

// Feeds ids[0..n) at positions pos..; afterwards m->s.logits and m->next_greedy describe the last
// position. all_logits (n, vocab_size), if given, receives every position's logits; with targets
// (n), returns the summed -log p(targets[i] | ids up to i). The GPU runs this batched.
static double feed(Model* m, const int* ids, long n, int pos, float* all_logits, const int* targets) {
    for (long i = 0; i < n; i++) {
        check_id(m, ids[i], pos + i);
        if (targets) check_id(m, targets[i], pos + i + 1);  // the token that follows position pos + i
    }
    if (pos + n > m->seq_len) die("%ld tokens at position %d pass the context length %d", n, pos, m->seq_len);
    size_t V = m->config.vocab_size;
    double nll = 0;
#ifdef USE_CUDA
    for (long i = 0, chunk = m->gpu->chunk; i < n; i += chunk) {
        int k = (int)(n - i < chunk ? n - i : chunk);
        nll += forward_batch_gpu(m, ids + i, k, pos + (int)i, all_logits ? all_logits + i * V : NULL, targets ? targets + i : NULL);
    }
#else
    for (long i = 0; i < n; i++) {
        float* logits = forward(m, ids[i], pos + (int)i);
        if (all_logits) memcpy(all_logits + i * V, logits, V * sizeof(float));
        if (targets) {  // log-sum-exp minus the target's logit
            float max = logits[m->next_greedy];
            double sum = 0;
            for (size_t j = 0; j < V; j++) sum += expf(logits[j] - max);
            nll += max + log(sum) - logits[targets[i]];
        }
    }
#endif
    return nll;
}

// ----------------------------------------------------------------------------
// Sampling: greedy, or temperature then top-k, top-p and min-p filtering.

typedef struct { float p; int id; } Candidate;

typedef struct {
    float temperature, top_p, min_p;
    int top_k;
    uint64_t rng;
    Candidate* candidates;  // (vocab_size)
} Sampler;

static uint64_t splitmix64(uint64_t x) {  // spreads a seed over 64 bits: seeds 1, 2, 3 start far apart
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static float random_f32(uint64_t* state) {  // xorshift64*, in [0, 1)
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return ((*state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static int by_prob_desc(const void* a, const void* b) {
    float pa = ((const Candidate*)a)->p, pb = ((const Candidate*)b)->p;
    return (pa < pb) - (pa > pb);
}

// Every token whose probability is >= cutoff, unsorted, and the top token whatever the rounding
// (every filter keeps it, so there is always a candidate). Returns how many.
static int collect(Sampler* s, const float* logits, int n, int top, float sum, float cutoff) {
    int kept = 0;
    for (int i = 0; i < n; i++) {
        float p = expf((logits[i] - logits[top]) / s->temperature) / sum;
        if (p >= cutoff || i == top) s->candidates[kept++] = (Candidate){p, i};
    }
    return kept;
}

// Hugging Face's order: temperature, top-k, top-p (over what top-k left, renormalised), min-p.
static int sample(Sampler* s, const float* logits, int n) {
    int top = argmax(logits, n);
    if (s->temperature == 0.0f) return top;
    double sum = 0;
    for (int i = 0; i < n; i++) sum += expf((logits[i] - logits[top]) / s->temperature);
    int top_k = s->top_k > 0 && s->top_k < n ? s->top_k : n;
    // Tokens below the cutoff can be in no top-p nucleus (together they hold less than 1 - top_p):
    // skip them before sorting. Top-p renormalises over the top k, though: lower the cutoff until
    // all k are in, or until any still missing is below 1e-30.
    float cutoff = s->top_p < 1.0f ? (1.0f - s->top_p) / (n - 1) : 0.0f;
    int kept = collect(s, logits, n, top, (float)sum, cutoff);
    while (kept < top_k && top_k < n && cutoff > 1e-30f) kept = collect(s, logits, n, top, (float)sum, cutoff /= 1024);
    qsort(s->candidates, kept, sizeof(Candidate), by_prob_desc);
    double mass = 1, prefix = 0;  // what top-k left: every token (the skipped ones too) unless it cut
    if (top_k < n) {
        if (kept > top_k) kept = top_k;
        mass = 0;
        for (int i = 0; i < kept; i++) mass += s->candidates[i].p;
    }
    for (int i = 0; i < kept; i++) {
        prefix += s->candidates[i].p;
        if (prefix >= s->top_p * mass) { kept = i + 1; break; }
    }
    float floor = s->min_p * s->candidates[0].p;
    while (kept > 1 && s->candidates[kept - 1].p < floor) kept--;
    mass = 0;
    for (int i = 0; i < kept; i++) mass += s->candidates[i].p;
    double r = random_f32(&s->rng) * mass, cdf = 0;  // in double, as mass: the last cdf is mass exactly
    for (int i = 0; i < kept; i++) {
        cdf += s->candidates[i].p;
        if (r < cdf) return s->candidates[i].id;
    }
    return s->candidates[kept - 1].id;
}

// ----------------------------------------------------------------------------
// Text in and out

// The whole of a file, a pipe or a FIFO, or stdin for "-", NUL-terminated.
static char* read_file(const char* path, size_t* len) {
    int from_stdin = !strcmp(path, "-");
    FILE* f = from_stdin ? stdin : fopen(path, "rb");
    if (!f) die("%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0) die("%s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) die("%s: is a directory", path);
    size_t cap = S_ISREG(st.st_mode) ? (size_t)st.st_size + 1 : 1 << 16, n = 0, got;
    char* buf = xmalloc(cap, path);
    while ((got = fread(buf + n, 1, cap - 1 - n, f)) > 0) {  // to the end: a pipe's size is not known
        n += got;
        if (n == cap - 1) buf = xrealloc(buf, cap *= 2, path);
    }
    if (ferror(f)) die("%s: read failed: %s", path, strerror(errno));
    if (!from_stdin) fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

static int* encode_or_die(const Tokenizer* t, const char* text, size_t len, long* n, const char* what) {
    int* ids;
    size_t bad = 0;
    *n = tokenizer_encode(t, text, len, &ids, &bad);
    if (*n < 0) die("%s is not valid UTF-8 (byte %zu)", what, bad);
    return ids;
}

// The whitespace-separated token ids of a file (logits mode). Their range needs the model's vocabulary:
// feed() checks it.
static int* parse_ids(const char* text, size_t len, const char* path, long* n) {
    int* ids = xmalloc((len / 2 + 1) * sizeof(int), "token ids");  // ids are separated: <= len/2 + 1
    *n = 0;
    for (const char* p = text; *p;) {
        if (isspace((unsigned char)*p)) { p++; continue; }
        char* end;
        errno = 0;
        long id = strtol(p, &end, 10);
        if (end == p || (*end && !isspace((unsigned char)*end)) || errno || id != (int)id) {
            int width = (int)strcspn(p, " \t\n\v\f\r");
            die("%s: token %ld (\"%.*s\") is not a token id", path, *n, width < 24 ? width : 24, p);
        }
        ids[(*n)++] = (int)id;
        p = end;
    }
    if (*n == 0) die("%s: no token ids", path);
    return ids;
}

static void print_token(const Tokenizer* t, Utf8Stream* out, int id) {
    size_t len;
    const char* piece = tokenizer_piece(t, id, &len);
    utf8_stream_write(out, piece, len, stdout);
    fflush(stdout);
}

enum { GENERATE, CHAT, PPL, TOKENIZE, LOGITS };  // -m, in the order of MODE_NAMES
static const char* const MODE_NAMES[] = {"generate", "chat", "ppl", "tokenize", "logits"};

typedef struct {
    const char* checkpoint;
    const char* tokenizer;  // -z
    const char* prompt;     // -i
    const char* system;     // -y
    const char* file;       // -f
    const char* output;     // -o
    int mode;               // -m
    int steps;              // -n
    int context;            // -c
    int thinking;           // -r
    int verbose;            // -v
    int fused;              // -a
    int kv_dtype;           // -e
    int use_k_scale;        // -K
} Options;

static int is_stop(const Tokenizer* t, int id) {
    return id == tokenizer_find(t, "<|im_end|>") || id == tokenizer_find(t, "<|endoftext|>");
}

static void print_ids(const char* label, const int* ids, long n) {
    fprintf(stderr, "%s:", label);
    for (long i = 0; i < n; i++) fprintf(stderr, " %d", ids[i]);
    fputc('\n', stderr);
}

// Feeds a prompt at positions pos.. and reports its speed. Returns the next free position.
static int prefill(Model* m, const int* ids, long n, int pos) {
    double start = now_s();
    feed(m, ids, n, pos, NULL, NULL);
    double dt = now_s() - start;
    fprintf(stderr, "[prefill: %ld token%s, %.1f tok/s, %.2f ms]\n", n, plural(n), n / (dt > 0 ? dt : 1e-9), dt * 1e3);
    return pos + (int)n;
}

// Samples up to `steps` tokens after the last logits (the prediction for position pos), streaming
// them, then a newline; stops before a stop token, which is not fed. Returns the next free position.
static int reply(Model* m, const Tokenizer* t, Sampler* s, int pos, int steps, int verbose) {
    Utf8Stream out = {0};
    double start = 0;
    int generated = 0;
    while (generated < steps && pos < m->seq_len) {
        int next = s->temperature == 0 ? m->next_greedy : sample(s, m->s.logits, m->config.vocab_size);
        if (is_stop(t, next)) break;
        if (verbose) fprintf(stderr, generated ? " %d" : "generated ids: %d", next);
        print_token(t, &out, next);
        generated++;
        forward(m, next, pos++);
        if (generated == 1) start = now_s();  // steady state: after the first step's one-time setup
    }
    utf8_stream_flush(&out, stdout);
    putchar('\n');  // replies read from a pipe stay apart, and the output ends its line
    fflush(stdout);
    if (verbose && generated) fputc('\n', stderr);
    if (generated > 1) fprintf(stderr, "[decode: %d tokens, %.1f tok/s]\n", generated, (generated - 1) / (now_s() - start));
    if (pos >= m->seq_len) fprintf(stderr, "[stopped: the context (%d tokens) is full]\n", m->seq_len);
    return pos;
}

static void generate(Model* m, const Tokenizer* t, Sampler* s, const Options* o, const int* ids, long n) {
    if (n >= m->seq_len) die("the prompt has %ld token%s; the context holds %d (raise -c)", n, plural(n), m->seq_len);
    if (o->verbose) print_ids("prompt ids", ids, n);
    int pos = prefill(m, ids, n, 0);
    reply(m, t, s, pos, o->steps ? o->steps : m->seq_len, o->verbose);
}

// The next line of stdin that is not empty (an empty line sends nothing), of any length, without its
// newline; NULL at the end of the input.
static const char* read_message(char** line, size_t* cap) {
    for (;;) {
        if (isatty(STDIN_FILENO)) fprintf(stderr, "> ");
        ssize_t got = getline(line, cap, stdin);
        if (got < 0) return NULL;
        if (got > 0 && (*line)[got - 1] == '\n') (*line)[--got] = 0;
        if (got > 0) return *line;
    }
}

// Qwen3's chat template, turn by turn: the cache keeps every earlier turn as it was generated. The
// messages are -i, then the lines of stdin. A full context ends the conversation.
static void chat(Model* m, const Tokenizer* t, Sampler* s, const Options* o) {
    char* line = NULL;
    size_t line_cap = 0;
    int pos = 0, steps = o->steps ? o->steps : m->seq_len;
    for (int turn = 0;; turn++) {
        const char* user = turn == 0 && o->prompt ? o->prompt : read_message(&line, &line_cap);
        if (!user) break;
        size_t cap = strlen(user) + (o->system ? strlen(o->system) : 0) + 256;
        char* text = xmalloc(cap, "the chat prompt");
        if (turn > 0) strcat(text, "<|im_end|>\n");  // closes the previous reply
        else if (o->system) snprintf(text, cap, "<|im_start|>system\n%s<|im_end|>\n", o->system);
        size_t used = strlen(text);
        snprintf(text + used, cap - used, "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n%s",
                 user, o->thinking ? "" : "<think>\n\n</think>\n\n");
        long n;
        int* ids = encode_or_die(t, text, strlen(text), &n, "the message");
        free(text);
        if (pos + n >= m->seq_len) {
            if (turn == 0) die("the first message needs %ld tokens; the context holds %d (raise -c)", n, m->seq_len);
            fprintf(stderr, "[the context is full: the message needs %ld token%s, %d of %d are left; "
                    "the conversation ends (raise -c)]\n", n, plural(n), m->seq_len - pos, m->seq_len);
            free(ids);
            break;
        }
        if (o->verbose) print_ids("prompt ids", ids, n);
        pos = reply(m, t, s, prefill(m, ids, n, pos), steps, o->verbose);
        free(ids);
        if (pos >= m->seq_len) break;  // reply() said so
    }
    free(line);
}

static volatile sig_atomic_t interrupted;  // Ctrl-C during perplexity
static void on_interrupt(int signal) { (void)signal; interrupted = 1; }

// Perplexity: ids[0..n) in consecutive windows of seq_len tokens, no overlap, each started with an empty
// cache; token j > 0 of a window is scored given tokens 0..j-1 of it. Ctrl-C stops after the current
// window and prints the result so far; returns the exit status: 130 (128 + SIGINT) then, else 0.
static int perplexity(Model* m, const int* ids, long n) {
    struct sigaction ctrl_c = {.sa_handler = on_interrupt, .sa_flags = SA_RESETHAND};  // a second one kills
    sigemptyset(&ctrl_c.sa_mask);
    sigaction(SIGINT, &ctrl_c, NULL);
    int tty = isatty(STDERR_FILENO);  // progress on one updating line, else a line per window
    double nll = 0, start = now_s();
    long scored = 0, end = 0;
    for (long w = 0; w + 1 < n && !interrupted; w += m->seq_len) {
        end = w + m->seq_len < n ? w + m->seq_len : n;
        nll += feed(m, ids + w, end - w - 1, 0, NULL, ids + w + 1);  // the last token only a target
        scored += end - w - 1;
        double rate = end / (now_s() - start);
        fprintf(stderr, "%s[ppl: %ld/%ld tokens, running ppl %.4f, %.0f s left, %.1f tok/s]%s", tty ? "\r" : "",
                end, n, exp(nll / scored), (n - end) / rate, rate, tty ? "\033[K" : "\n");  // \033[K: clear the rest
    }
    if (tty) fputc('\n', stderr);
    if (interrupted) fprintf(stderr, "[ppl: interrupted: the result of the first %ld of %ld tokens]\n", end, n);
    printf("ppl %.6f nll %.8f tokens %ld\n", exp(nll / scored), nll / scored, scored);
    return interrupted ? 130 : 0;
}

static void tokenize(const Tokenizer* t, const Options* o) {
    if (!o->file && !o->prompt) die("tokenize needs -f FILE or -i \"text\"");
    size_t len;
    char* text = o->file ? read_file(o->file, &len) : NULL;
    if (!text) len = strlen(o->prompt);
    long n;
    int* ids = encode_or_die(t, text ? text : o->prompt, len, &n, o->file ? o->file : "the text");
    for (long i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
    free(ids);
    free(text);
}

// Feeds the token ids of -f, then decodes -n more greedily, printing them; with -o, writes the float32
// logits of every position fed, (positions, vocab_size), for tests.
static void logits_mode(Model* m, const Options* o, const int* ids, long n) {
    size_t V = m->config.vocab_size;
    if (n + o->steps > m->seq_len) die("%s: %ld id%s and -n %d need more than the context (%d; raise -c)", o->file, n, plural(n), o->steps, m->seq_len);
    float* logits = o->output ? xmalloc((n + o->steps) * V * sizeof(float), "logits") : NULL;
    feed(m, ids, n, 0, logits, NULL);
    for (int i = 0; i < o->steps; i++) {
        int next = m->next_greedy;
        printf(i ? " %d" : "%d", next);
        float* step = forward(m, next, (int)n + i);
        if (logits) memcpy(logits + (n + i) * V, step, V * sizeof(float));
    }
    printf("\n");
    if (o->output) {
        FILE* out = fopen(o->output, "wb");
        if (!out) die("%s: %s", o->output, strerror(errno));
        if (fwrite(logits, sizeof(float) * V, n + o->steps, out) != (size_t)(n + o->steps) || fclose(out) != 0)
            die("%s: write failed", o->output);
    }
    free(logits);
}

// What a mode reads before the model loads, so that a missing prompt or file, or text that is not
// UTF-8, fails at once: the token ids of the prompt (generate), of the text (ppl), of the file (logits).
static int* read_input(const Options* o, const Tokenizer* t, long* n) {
    *n = 0;
    if (o->mode == CHAT) return NULL;
    if (o->mode == GENERATE) {
        if (!o->prompt || !*o->prompt) die("generate needs a prompt: -i \"text\"");
        return encode_or_die(t, o->prompt, strlen(o->prompt), n, "the prompt");
    }
    if (!o->file) die("%s needs a file: -f FILE (- reads stdin)", MODE_NAMES[o->mode]);
    size_t len;
    char* text = read_file(o->file, &len);
    int* ids = o->mode == PPL ? encode_or_die(t, text, len, n, o->file) : parse_ids(text, len, o->file, n);
    free(text);
    if (o->mode == PPL && o->steps && o->steps < *n) *n = o->steps;  // -n: the first N tokens only
    if (o->mode == PPL && *n < 2) die("%s: %ld token%s to score; perplexity needs at least 2", o->file, *n, plural(*n));
    return ids;
}

// ----------------------------------------------------------------------------
// Command line

static void usage(void) {
    printf(
        "usage: run model.bin [options]       (run -m tokenize needs no model)\n"
        "  -m MODE  generate (default) | chat | ppl | tokenize | logits\n"
        "  -i TEXT  prompt (generate), first message (chat), text (tokenize)\n"
        "  -y TEXT  system prompt (chat)\n"
        "  -r 0|1   thinking (default 1): sets the defaults T 0.6 / top-p 0.95 (1) or 0.7 / 0.8 (0)\n"
        "  -t T     temperature, 0 = greedy        -p P  top-p in (0, 1]\n"
        "  -k K     top-k, 0 = off (default 20)    -P P  min-p in [0, 1] (default 0)\n"
        "  -s SEED  random seed (default: time)\n"
        "  -n N     tokens to generate per reply (default 0: to the context end); ppl: only the text's first N tokens\n"
        "  -c N     context length (default min(4096, the model's)); ppl: the window\n"
        "  -f FILE  input file, - for stdin (ppl, tokenize: text; logits: token ids)\n"
        "  -o FILE  logits: write every position's float32 logits here\n"
        "  -z FILE  tokenizer (default: tokenizer.bin in the current directory, else beside the program)\n"
        "  -v 0|1   print the prompt's and the generated token ids to stderr\n"
        "  -a 0|1   GPU: one persistent kernel per decoded token and the TMA matrix products in prefill (1),\n"
        "           or the reference kernels: the chain per token, the simple products (0); default 1,\n"
        "           0 for int8 weights (faster there so far)\n"
        "  -e bf16|fp16  GPU: KV cache dtype (default bf16)\n"
        "  -K 0|1   use the checkpoint's per-layer K scale (default 1; 0 shows why it exists)\n"
        "  -h       this help (also --help)\n");
}

static double parse_number(const char* flag, const char* s, double lo, double hi) {
    char* end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !(v >= lo && v <= hi)) die("%s %s: expected a number in [%g, %g]", flag, s, lo, hi);
    return v;
}

// The default tokenizer: tokenizer.bin in the current directory, else beside the program, so that a
// binary run from elsewhere finds the one it was built with.
static const char* default_tokenizer(void) {
    static char beside[PATH_MAX + sizeof "tokenizer.bin"];
    if (access("tokenizer.bin", F_OK) == 0) return "tokenizer.bin";
    ssize_t n = readlink("/proc/self/exe", beside, PATH_MAX);
    char* slash = NULL;
    if (n > 0 && n < PATH_MAX) {
        beside[n] = 0;
        slash = strrchr(beside, '/');
    }
    if (!slash) die("tokenizer.bin is not in the current directory: give its path with -z FILE");
    strcpy(slash + 1, "tokenizer.bin");
    if (access(beside, F_OK) == 0) return beside;
    slash[1] = 0;
    die("tokenizer.bin is neither in the current directory nor beside the program (%s): give its path with -z FILE", beside);
}

int main(int argc, char** argv) {
    Options o = {.mode = GENERATE, .thinking = 1, .use_k_scale = 1, .fused = -1};
    float temperature = -1, top_p = -1, min_p = 0;
    int top_k = 20;
    uint64_t seed = (uint64_t)time(NULL);
    int i = 1;
    if (argc >= 2 && argv[1][0] != '-') o.checkpoint = argv[i++];
    for (; i < argc; i += 2) {
        const char* f = argv[i];
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) { usage(); return 0; }
        if (f[0] != '-' || !f[1] || f[2]) die("unknown argument %s (run with -h for help)", f);
        if (i + 1 >= argc) die("%s needs a value", f);
        const char* v = argv[i + 1];
        switch (f[1]) {
            case 't': temperature = parse_number(f, v, 0, 100); break;
            case 'p': top_p = parse_number(f, v, 1e-6, 1); break;
            case 'k': top_k = (int)parse_number(f, v, 0, 1 << 22); break;
            case 'P': min_p = parse_number(f, v, 0, 1); break;
            case 's': seed = (uint64_t)parse_number(f, v, 0, 9e15); break;
            case 'n': o.steps = (int)parse_number(f, v, 0, 1 << 24); break;
            case 'c': o.context = (int)parse_number(f, v, 2, 1 << 24); break;
            case 'r': o.thinking = (int)parse_number(f, v, 0, 1); break;
            case 'v': o.verbose = (int)parse_number(f, v, 0, 1); break;
            case 'a': o.fused = (int)parse_number(f, v, 0, 1); break;
            case 'K': o.use_k_scale = (int)parse_number(f, v, 0, 1); break;
            case 'e':
                if (strcmp(v, "bf16") && strcmp(v, "fp16")) die("-e %s: expected bf16 or fp16", v);
                o.kv_dtype = strcmp(v, "bf16") ? 2 : 1;
                break;
            case 'i': o.prompt = v; break;
            case 'y': o.system = v; break;
            case 'f': o.file = v; break;
            case 'o': o.output = v; break;
            case 'z': o.tokenizer = v; break;
            case 'm':
                o.mode = -1;
                for (int j = 0; j < (int)(sizeof MODE_NAMES / sizeof *MODE_NAMES); j++) if (!strcmp(v, MODE_NAMES[j])) o.mode = j;
                if (o.mode < 0) die("-m %s: expected generate, chat, ppl, tokenize or logits", v);
                break;
            default: die("unknown flag %s (run with -h for help)", f);
        }
    }
    if (o.kv_dtype == 0) o.kv_dtype = 1;
    if (temperature < 0) temperature = o.thinking ? 0.6f : 0.7f;
    if (top_p < 0) top_p = o.thinking ? 0.95f : 0.8f;

    // Everything that needs no model is checked before it loads.
    Tokenizer tokenizer;
    if (o.mode != LOGITS) tokenizer_load(&tokenizer, o.tokenizer ? o.tokenizer : default_tokenizer());
    if (o.mode == TOKENIZE) { tokenize(&tokenizer, &o); tokenizer_free(&tokenizer); return 0; }
    if (!o.checkpoint) die("no model given: run model.bin [options] (-h for help)");
    long n_ids;
    int* ids = read_input(&o, &tokenizer, &n_ids);

    static Model m;
    double start = now_s();
    load_checkpoint(&m, o.checkpoint);  // the header, and the shapes the GPU kernels take, on any machine
#ifdef USE_CUDA
    require_gpu();
#endif
    Config* c = &m.config;
    if (o.context > c->max_seq_len) die("-c %d: the model's context is %d", o.context, c->max_seq_len);
    m.seq_len = o.context ? o.context : (c->max_seq_len < 4096 ? c->max_seq_len : 4096);
    m.use_k_scale = o.use_k_scale;
    m.need_logits = temperature > 0 || o.mode == PPL || o.mode == LOGITS;
#ifdef USE_CUDA
    // the default decode path is the faster one measured (RESULTS.md): the persistent kernel, except
    // for int8 weights, where the chain of kernels is faster so far
    if (o.fused < 0) o.fused = c->wdtype != W_INT8;
    init_gpu(&m, o.kv_dtype == 1 ? DT_BF16 : DT_F16, o.fused);
#else
    init_cpu(&m);
#endif
    fprintf(stderr, "[loaded %s in %.2f s: %s, %d layers, dim %d, %d q / %d kv heads, vocab %d, context %d]\n",
            o.checkpoint, now_s() - start, WDTYPE_NAMES[c->wdtype], c->n_layers, c->dim, c->n_heads, c->n_kv_heads,
            c->vocab_size, m.seq_len);

    Sampler sampler = {temperature, top_p, min_p, top_k, splitmix64(seed) | 1, NULL};  // xorshift needs a nonzero state
    sampler.candidates = xmalloc((size_t)c->vocab_size * sizeof(Candidate), "the sampler");
    int status = 0;
    switch (o.mode) {
        case GENERATE: generate(&m, &tokenizer, &sampler, &o, ids, n_ids); break;
        case CHAT: chat(&m, &tokenizer, &sampler, &o); break;
        case PPL: status = perplexity(&m, ids, n_ids); break;
        case LOGITS: logits_mode(&m, &o, ids, n_ids); break;
    }
    return status;
}
