// attention.cuh: decode attention of one query token over the KV cache (flash-decoding), as device
// functions shared by the chain of kernels (attention.cu) and the persistent decode kernel (decode.cu),
// so that both paths compute the same function.
//
// Cache rows 0..pos are cut into n_chunks chunks of equal length (a multiple of ATT_ROW_GRANULE
// rows). n_chunks depends on seq_len only, never on pos, which lives on the device (so a step can be
// captured in a CUDA graph): the chunks that start past pos are idle. One work item = one chunk of
// one KV head for the query heads of one subgroup of its group (up to G heads): it reads its rows
// once for every served head (GQA), with an online softmax in fp32, and writes per query head the
// partial (running max m, sum l, unnormalised output acc[hd]) to scratch. merge_heads then sums
// a head's partials, each rescaled to the running max, and normalises them.
#pragma once
#include "common.cuh"

constexpr int ATT_THREADS = 128;       // the chain's chunk kernel (the persistent kernel has more warps)
constexpr int ATT_WARPS = ATT_THREADS / 32;
constexpr int ATT_MAX_GROUP = 8;       // query heads served per item: Qwen GQA ratios are 1..8; the
                                       // code is instantiated for a cap G of 2, 4 or 8 heads, the
                                       // smallest that holds the group, as the softmax state lives in registers
constexpr int ATT_MAX_CHUNKS = 64;
constexpr int ATT_ROW_GRANULE = 16;    // chunk lengths are multiples of this: short contexts still
                                       // spread over many blocks (pos 128: 9 chunks of 16 rows per KV head)

static __host__ __device__ __forceinline__ int attention_n_chunks(int seq_len) {
    const int n = (seq_len + ATT_ROW_GRANULE - 1) / ATT_ROW_GRANULE;
    return n < 1 ? 1 : n > ATT_MAX_CHUNKS ? ATT_MAX_CHUNKS : n;
}
// rows per chunk for len = pos + 1 attended rows
static __device__ __forceinline__ int attention_chunk_rows(int len, int n_chunks) {
    const int rows = (len + n_chunks - 1) / n_chunks;
    return (rows + ATT_ROW_GRANULE - 1) / ATT_ROW_GRANULE * ATT_ROW_GRANULE;
}

// How attend_chunk reads the cache: a row by LPR = HD/8 lanes, 16 bytes each, so RPW = 32/LPR rows
// per warp load, and U loads of a lane before any is used (fewer when the state of 8 heads takes
// the registers): a pass of the block's WARPS warps reads WARPS * RPW * U rows.
template <int HD, int G> struct AttendLoads {
    static constexpr int LPR = HD / 8, RPW = 32 / LPR, U = G <= 2 ? 4 : 2;
};

template <int HD, int G, int WARPS> struct AttendShared {
    float q[G][HD];           // the served queries, pre-multiplied by scale
    float acc[WARPS][G][HD];  // per-warp softmax states, merged at the end
    float m[WARPS][G], l[WARPS][G];
};

// The query heads an item serves: count (<= G) heads from h0, subgroup `subgroup` of KV head kv_head's group.
struct ServedHeads { int h0, count; };
template <int G>
__device__ __forceinline__ ServedHeads served_heads(int kv_head, int subgroup, int n_heads, int n_kv_heads) {
    const int group_size = n_heads / n_kv_heads;
    return {kv_head * group_size + subgroup * G, min(G, group_size - subgroup * G)};
}

__device__ __forceinline__ float rescale_factor(float m, float m_new) {  // exp(m - m_new), 0 for no rows
    return m == -INFINITY ? 0.f : expf(m - m_new);
}

// Where the partial of query head h over chunk c lies in the scratch of attention_scratch_floats():
// (m, l, acc[hd]) from partial_at(h, c, ...) on.
__host__ __device__ __forceinline__ size_t partial_at(int h, int c, int n_chunks, int hd) {
    return ((size_t)h * n_chunks + c) * (hd + 2);
}

// One block of WARPS warps: the chunk `chunk` of KV head kv_head for the served heads (sh.q holds their queries, times
// scale); caches (seq_len, n_kv_heads, HD); len = rows attended (pos + 1). Its partials go to
// result(head, d, m, l, acc[d]), once for each served head and d (the callers store them at
// partial_at(head, chunk, ...)). The caller skips chunks that start past len. Lanes: as AttendLoads;
// each lane keeps the softmax state of its 8 dims for every served head.
// The cache is read through L2 (common.cuh, VIA_L2): in the persistent decode kernel, row len - 1 was
// stored by this block a moment before, where the read-only path (__ldg) is undefined. The chain's
// chunk kernel runs the same loads; a block reads each of its rows once, so skipping L1 costs nothing.
template <typename KV, int HD, int G, int WARPS, typename Result>
__device__ void attend_chunk(AttendShared<HD, G, WARPS>& sh, Result result, const KV* k_cache, const KV* v_cache,
                             int kv_head, ServedHeads heads, int chunk, int len, int n_chunks, int n_kv_heads) {
    constexpr int LPR = AttendLoads<HD, G>::LPR, RPW = AttendLoads<HD, G>::RPW, U = AttendLoads<HD, G>::U;
    const int rows = attention_chunk_rows(len, n_chunks), start = chunk * rows;
    const int end = min(start + rows, len);
    const int group = heads.count;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int seg = lane % LPR, row_in_load = lane / LPR;

    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) acc[g][j] = 0.f;
    }
    for (int base = start + warp * RPW * U; base < end; base += WARPS * RPW * U) {
        Pack<KV> kp[U], vp[U];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int r = base + u * RPW + row_in_load;
            valid[u] = r < end;
            const size_t off = ((size_t)r * n_kv_heads + kv_head) * HD + seg * 8;
            kp[u] = valid[u] ? load_pack<KV, VIA_L2>(k_cache + off) : zero_pack<KV>();
            vp[u] = valid[u] ? load_pack<KV, VIA_L2>(v_cache + off) : zero_pack<KV>();
        }
        // scores s[u][g] = q_g . k_row, summed over the row's LPR lanes
        float s[U][G];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[8];
            unpack(kp[u], kf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                if (g >= group) break;
                const float4 qa = *reinterpret_cast<const float4*>(&sh.q[g][seg * 8]);
                const float4 qb = *reinterpret_cast<const float4*>(&sh.q[g][seg * 8 + 4]);
                float d = qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] +
                          qb.x * kf[4] + qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
#pragma unroll
                for (int o = LPR / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                s[u][g] = valid[u] ? d : -INFINITY;
            }
        }
        // online softmax: s becomes the weights p, the state is rescaled to the new max
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (g >= group) break;
            float m_new = m[g];
#pragma unroll
            for (int u = 0; u < U; u++) m_new = fmaxf(m_new, s[u][g]);
            if (m_new == -INFINITY) {  // no valid row for this lane group yet
#pragma unroll
                for (int u = 0; u < U; u++) s[u][g] = 0.f;
                continue;
            }
            const float corr = rescale_factor(m[g], m_new);
            m[g] = m_new;
            l[g] *= corr;
#pragma unroll
            for (int j = 0; j < 8; j++) acc[g][j] *= corr;
#pragma unroll
            for (int u = 0; u < U; u++) {
                s[u][g] = expf(s[u][g] - m_new);
                l[g] += s[u][g];
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float vf[8];
            unpack(vp[u], vf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                if (g >= group) break;
#pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] = fmaf(s[u][g], vf[j], acc[g][j]);
            }
        }
    }
    // merge the warp's row groups (lanes with the same seg), then the warps through shared memory
#pragma unroll
    for (int o = LPR; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (g >= group) break;
            const float m_other = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float l_other = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float m_new = fmaxf(m[g], m_other);
            const float a = rescale_factor(m[g], m_new), b = rescale_factor(m_other, m_new);
            l[g] = l[g] * a + l_other * b;
#pragma unroll
            for (int j = 0; j < 8; j++)
                acc[g][j] = acc[g][j] * a + __shfl_xor_sync(0xffffffffu, acc[g][j], o) * b;
            m[g] = m_new;
        }
    }
    if (row_in_load == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (g >= group) break;
            if (seg == 0) { sh.m[warp][g] = m[g]; sh.l[warp][g] = l[g]; }
#pragma unroll
            for (int j = 0; j < 8; j++) sh.acc[warp][g][seg * 8 + j] = acc[g][j];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        float m_all = -INFINITY;  // finite: warp 0 holds the chunk's first row
        for (int w = 0; w < WARPS; w++) m_all = fmaxf(m_all, sh.m[w][g]);
        float l_all = 0.f, a_all = 0.f;
        for (int w = 0; w < WARPS; w++) {
            const float f = rescale_factor(sh.m[w][g], m_all);
            l_all += sh.l[w][g] * f;
            a_all += sh.acc[w][g][d] * f;
        }
        result(heads.h0 + g, d, m_all, l_all, a_all);
    }
    __syncthreads();  // sh is reused by the block's next work item
}

// One block: the outputs of `count` query heads from h0 on, each merged from its chunk partials
// (the scratch layout of attend_chunk), of which the first ceil(len / chunk_rows) were written by
// other blocks: out(head, d, value). A thread issues the loads of (m, l, acc[d]) of BATCH chunks at
// once, so a merge of up to BATCH chunks costs one round trip to L2 (two, m and l first, measured
// 1.07x slower at the 0.6B shape); the chunks are folded in one by one, rescaled to the running max.
// The partials are read through `partials`: fetch(i) issues the load of scratch element i,
// value(word, i) gives its value (the chain reads floats; the persistent kernel waits for published
// words, decode.cu).
template <typename Partials, typename Out>
__device__ __forceinline__ void merge_heads(const Partials& partials, Out out, int h0, int count, int len, int n_chunks,
                                            int hd) {
    constexpr int BATCH = 8;  // 24 loads in flight a thread (16 spill the persistent kernel's registers)
    const int rows = attention_chunk_rows(len, n_chunks), n_active = (len + rows - 1) / rows;
    for (int i = threadIdx.x; i < count * hd; i += blockDim.x) {
        const int g = i / hd, d = i % hd;
        float m_all = -INFINITY, l_all = 0.f, a_all = 0.f;
        for (int c0 = 0; c0 < n_active; c0 += BATCH) {
            decltype(partials.fetch(0)) m_word[BATCH], l_word[BATCH], a_word[BATCH];
#pragma unroll
            for (int j = 0; j < BATCH; j++)
                if (c0 + j < n_active) {
                    const size_t at = partial_at(h0 + g, c0 + j, n_chunks, hd);
                    m_word[j] = partials.fetch(at);
                    l_word[j] = partials.fetch(at + 1);
                    a_word[j] = partials.fetch(at + 2 + d);
                }
#pragma unroll
            for (int j = 0; j < BATCH; j++)
                if (c0 + j < n_active) {
                    const size_t at = partial_at(h0 + g, c0 + j, n_chunks, hd);
                    const float m = partials.value(m_word[j], at), m_new = fmaxf(m_all, m);
                    const float f_all = rescale_factor(m_all, m_new), f = expf(m - m_new);
                    l_all = l_all * f_all + partials.value(l_word[j], at + 1) * f;
                    a_all = a_all * f_all + partials.value(a_word[j], at + 2 + d) * f;
                    m_all = m_new;
                }
        }
        out(h0 + g, d, a_all / l_all);
    }
}

// The chain's partials: floats written by the kernel before (read through L2, as the cache)
struct ScratchPartials {
    const float* scratch;
    __device__ float fetch(size_t i) const { return __ldcg(scratch + i); }
    __device__ float value(float loaded, size_t) const { return loaded; }
};

inline void check_attention_shape(int kv_dtype, int n_heads, int n_kv_heads, int head_dim, const char* who) {
    if (kv_dtype != DT_BF16 && kv_dtype != DT_F16) {
        fprintf(stderr, "error: %s: KV cache dtype %d is not bf16 or fp16\n", who, kv_dtype);
        exit(1);
    }
    if (head_dim != 8 && head_dim != 16 && head_dim != 32 && head_dim != 64 && head_dim != 128) {
        fprintf(stderr, "error: %s: head_dim %d is not 8, 16, 32, 64 or 128\n", who, head_dim);
        exit(1);
    }
    if (n_kv_heads < 1 || n_heads % n_kv_heads != 0) {
        fprintf(stderr, "error: %s: n_heads %d is not a multiple of n_kv_heads %d\n", who, n_heads, n_kv_heads);
        exit(1);
    }
}

#define DISPATCH_HD(HD_VAR, BODY)                                 \
    switch (HD_VAR) {                                             \
        case 8: { constexpr int HD = 8; BODY; } break;            \
        case 16: { constexpr int HD = 16; BODY; } break;          \
        case 32: { constexpr int HD = 32; BODY; } break;          \
        case 64: { constexpr int HD = 64; BODY; } break;          \
        default: { constexpr int HD = 128; BODY; } break;         \
    }

// G: the group cap for n_heads / n_kv_heads query heads per KV head
#define DISPATCH_GROUP(GROUP, BODY)                               \
    if ((GROUP) <= 2) { constexpr int G = 2; BODY; }              \
    else if ((GROUP) <= 4) { constexpr int G = 4; BODY; }         \
    else { constexpr int G = ATT_MAX_GROUP; BODY; }
