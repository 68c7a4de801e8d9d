/* The small operations of a decoder layer, fused, for fp32 on an x86-64 CPU with AVX2: RMSNorm with
the residual add before it, rotary embedding of q and k with the write of k and v into the paged
KV cache, SiLU(gate) * up, and attention of a few query tokens per sequence over the paged cache
read in place. Each replaces several torch ops (and their Python) with one call.

Every result of a row (a token, a query) is computed by the same code in the same order however
many rows run with it, so a token's output never depends on its batch: reductions keep a fixed
order per row, element-wise maths are the same vector code for every element (tails run through
a padded buffer), and rows are split among threads only as whole rows.
*/
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for 8 floats: Cephes' polynomial on a range reduction by ln 2 (relative error ~2e-7). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 floats from p, or the n < 8 left with zeros after them. */
static inline __m256 load_part(const float *p, int64_t n) {
    if (n >= 8) return _mm256_loadu_ps(p);
    float buf[8] = {0};
    memcpy(buf, p, n * sizeof(float));
    return _mm256_loadu_ps(buf);
}

static inline void store_part(float *p, __m256 v, int64_t n) {
    if (n >= 8) {
        _mm256_storeu_ps(p, v);
        return;
    }
    float buf[8];
    _mm256_storeu_ps(buf, v);
    memcpy(p, buf, n * sizeof(float));
}

/* Sum of a[i] * b[i] over n floats, in 8 lanes, then the lanes in a fixed order. */
static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8)
        acc = _mm256_add_ps(acc, _mm256_mul_ps(load_part(a + i, n - i), load_part(b + i, n - i)));
    return hsum8(acc);
}

/* x: [M, H]; when delta is not NULL, first x += delta (the residual stream, in place). Then
   out = weight * (x / sqrt(mean(x^2) + eps)). */
void rms_norm(float *x, const float *delta, int64_t M, int64_t H, const float *weight, float eps, float *out,
              int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (M * H >= 32768)
    for (int64_t r = 0; r < M; r++) {
        float *row = x + r * H;
        if (delta) {
            const float *d = delta + r * H;
            for (int64_t h = 0; h < H; h += 8)
                store_part(row + h, _mm256_add_ps(load_part(row + h, H - h), load_part(d + h, H - h)), H - h);
        }
        float mean = dot(row, row, H) / (float)H;
        __m256 inv = _mm256_set1_ps(1.0f / sqrtf(mean + eps));
        float *o = out + r * H;
        for (int64_t h = 0; h < H; h += 8) {
            __m256 v = _mm256_mul_ps(load_part(row + h, H - h), inv);
            store_part(o + h, _mm256_mul_ps(load_part(weight + h, H - h), v), H - h);
        }
    }
}

/* gate_up: [M, 2 * I] (gate, then up); out: [M, I] = silu(gate) * up = gate / (1 + e^-gate) * up. */
void silu_mul(const float *gate_up, int64_t M, int64_t I, float *out, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (M * I >= 16384)
    for (int64_t r = 0; r < M; r++) {
        const float *g = gate_up + r * 2 * I, *u = g + I;
        float *o = out + r * I;
        for (int64_t i = 0; i < I; i += 8) {
            __m256 gv = load_part(g + i, I - i);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            store_part(o + i, _mm256_mul_ps(s, load_part(u + i, I - i)), I - i);
        }
    }
}

/* The KV cache holds fp32 or fp16 (kv_half: 1) elements; 8 of them at element i of p, as floats. */
static inline __m256 load_kv(const void *p, int64_t i, int kv_half) {
    if (kv_half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

/* 8 floats into the cache's element type (fp16: rounded to nearest even). */
static inline void store_kv(void *p, int64_t i, __m256 v, int kv_half) {
    if (kv_half) _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    else _mm256_storeu_ps((float *)p + i, v);
}

/* q . k over D floats (a multiple of 8): fused multiply-adds into 4 accumulators of 8 lanes (vector i
   into accumulator i % 4: short dependency chains), summed as (a0 + a1) + (a2 + a3), then the lanes,
   all in a fixed order. */
static inline float dot_kv(const float *q, const void *k, int64_t D, int kv_half) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= D; i += 32)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8 * j), load_kv(k, i + 8 * j, kv_half), acc[j]);
    for (int j = 0; i < D; i += 8, j++)
        acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_kv(k, i, kv_half), acc[j]);
    return hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

/* The transpose-reduce of 8 accumulators: lane r is the sum of acc[r]'s lanes, as
   ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); horizontal adds pair lanes of one accumulator,
   so row r's sum never mixes with another row's. */
static inline __m256 reduce8(const __m256 *acc) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* The scores of up to SCORE_HEADS query heads of a KV head are computed together, each key vector
   converted once for all of them: 8 keys at a time where 32 vector registers hold 3 heads' 8
   accumulators (AVX-512VL), else 4 at a time (12 of the 16 registers). Per head and key the
   operations are the same either way (reduce4 adds the lanes as reduce8 does), so the bits are too. */
#define SCORE_HEADS 3
#if defined(__AVX512VL__)
#define SCORE_KEYS 8
#else
#define SCORE_KEYS 4
#endif

/* q_h . k_r * scale for NH <= SCORE_HEADS query heads (q_h = q + h * D) and the KEYS (8 or 4) key
   rows k_r = k + r * D elements (D a multiple of 8): per head KEYS accumulators of fused
   multiply-adds over D in order, then the transpose-reduce, into out[h * 8 + r]. NH and KEYS are
   constants where it is inlined. */
static inline __attribute__((always_inline)) void dot_keys_kv(const float *q, const char *k, int64_t D, int64_t elem,
                                                              int kv_half, int NH, int KEYS, float scale,
                                                              float *out) {
    __m256 acc[SCORE_HEADS][8];
    for (int h = 0; h < NH; h++)
        for (int r = 0; r < KEYS; r++) acc[h][r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
        __m256 qv[SCORE_HEADS];
        for (int h = 0; h < NH; h++) qv[h] = _mm256_loadu_ps(q + h * D + i);
        for (int r = 0; r < KEYS; r++) {
            const __m256 kv = load_kv(k + r * D * elem, i, kv_half);
            for (int h = 0; h < NH; h++) acc[h][r] = _mm256_fmadd_ps(qv[h], kv, acc[h][r]);
        }
    }
    for (int h = 0; h < NH; h++) {
        if (KEYS == 8) {
            _mm256_storeu_ps(out + h * 8, _mm256_mul_ps(reduce8(acc[h]), _mm256_set1_ps(scale)));
        } else {  /* reduce8's sums for 4 rows: the low half's lanes plus the high half's */
            const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
            const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            _mm_storeu_ps(out + h * 8, _mm_mul_ps(sums, _mm_set1_ps(scale)));
        }
    }
}

/* dot_keys_kv of 8 keys (two calls of 4 where SCORE_KEYS is 4) with NH a constant. */
static inline __attribute__((always_inline)) void dot8_heads_kv(const float *q, const char *k, int64_t D,
                                                                int64_t elem, int kv_half, int NH, float scale,
                                                                float *out) {
    for (int r0 = 0; r0 < 8; r0 += SCORE_KEYS)
        dot_keys_kv(q, k + r0 * D * elem, D, elem, kv_half, NH, SCORE_KEYS, scale, out + r0);
}

/* The cache of one layer: [num_blocks, 2 (k, v), Hkv, block_size, D] elements. A head's keys (values)
   in a block: block_size * D elements from element ((block * 2 + kv) * Hkv + head) * block_size * D. */
static inline int64_t head_rows(int64_t block, int kv, int64_t head, int64_t Hkv, int64_t block_size, int64_t D) {
    return ((block * 2 + kv) * Hkv + head) * block_size * D;
}

/* qkv: [M, (Hq + 2 * Hkv) * D], each row q heads, k heads, v heads. Rotates q and k in place by
   each token's cos/sin ([M, D / 2], the rotate-half layout), then writes k and v into kv_cache
   ([num_blocks, 2, Hkv, block_size, D], fp32 or fp16: kv_half) at slots[r] (block * block_size + offset). */
void rotary_write_kv(float *qkv, int64_t M, int64_t Hq, int64_t Hkv, int64_t D, const float *cos, const float *sin,
                     void *kv_cache, int kv_half, int64_t block_size, const int64_t *slots, int num_threads) {
    const int64_t half = D / 2, width = (Hq + 2 * Hkv) * D, elem = kv_half ? 2 : 4;
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (M >= 64)
    for (int64_t r = 0; r < M; r++) {
        float *row = qkv + r * width;
        const float *c = cos + r * half, *s = sin + r * half;
        for (int64_t head = 0; head < Hq + Hkv; head++) {
            float *x1 = row + head * D, *x2 = x1 + half;
            for (int64_t i = 0; i < half; i += 8) {
                __m256 a = load_part(x1 + i, half - i), b = load_part(x2 + i, half - i);
                __m256 cv = load_part(c + i, half - i), sv = load_part(s + i, half - i);
                __m256 first = _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv));
                __m256 second = _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv));
                store_part(x1 + i, first, half - i);
                store_part(x2 + i, second, half - i);
            }
        }
        const float *kv = row + Hq * D;  /* k heads then v heads: [2, Hkv, D], D a multiple of 8 */
        const int64_t block = slots[r] / block_size, offset = slots[r] % block_size;
        for (int kind = 0; kind < 2; kind++)
            for (int64_t head = 0; head < Hkv; head++) {
                char *dst = (char *)kv_cache + (head_rows(block, kind, head, Hkv, block_size, D) + offset * D) * elem;
                const float *src = kv + (kind * Hkv + head) * D;
                for (int64_t i = 0; i < D; i += 8) store_kv(dst, i, _mm256_loadu_ps(src + i), kv_half);
            }
    }
}

#define MAX_GROUP 16  /* query heads per KV head the attention takes */
#define V_HEADS 3  /* query heads whose weighted values are summed in one pass over V: 3 x 4 accumulators */

/* out[h] = sum_p s[h][p] * v_p for heads h < NH, floats [i0, i0 + 8 * NV) of a head, in registers,
   then scaled by inv[h]. Each lane sums over p in order, so the grouping of heads and floats never
   changes a result. */
static inline __attribute__((always_inline)) void weigh_values(
        const char *cache, int64_t elem, int64_t Hkv, int64_t kv_head, const int64_t *table,
        int64_t block_size, int64_t len, const float *s, int64_t max_len, const float *inv, float *o, int64_t D,
        int64_t i0, int NH, int NV, int kv_half) {
    __m256 acc[V_HEADS][4];
    for (int h = 0; h < NH; h++)
        for (int j = 0; j < NV; j++) acc[h][j] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < len; b0 += block_size) {
        const int64_t n = len - b0 < block_size ? len - b0 : block_size;
        const char *v = cache + (head_rows(table[b0 / block_size], 1, kv_head, Hkv, block_size, D) + i0) * elem;
        for (int64_t p = b0; p < b0 + n; p++, v += D * elem) {
            for (int h = 0; h < NH; h++) {
                const __m256 w = _mm256_set1_ps(s[h * max_len + p]);
                for (int j = 0; j < NV; j++) acc[h][j] = _mm256_fmadd_ps(w, load_kv(v, 8 * j, kv_half), acc[h][j]);
            }
        }
    }
    for (int h = 0; h < NH; h++)
        for (int j = 0; j < NV; j++)
            _mm256_storeu_ps(o + h * D + i0 + 8 * j, _mm256_mul_ps(acc[h][j], _mm256_set1_ps(inv[h])));
}

/* weigh_values with its counts as constants (so that the accumulators stay in registers). */
static inline __attribute__((always_inline)) void weigh_values_for(
        const char *cache, int64_t elem, int64_t Hkv, int64_t kv_head, const int64_t *table,
        int64_t block_size, int64_t len, const float *s, int64_t max_len, const float *inv, float *o, int64_t D,
        int NH, int kv_half) {
    int64_t i0 = 0;
    for (; i0 + 32 <= D; i0 += 32)
        weigh_values(cache, elem, Hkv, kv_head, table, block_size, len, s, max_len, inv, o, D, i0, NH, 4, kv_half);
    for (; i0 < D; i0 += 8)
        weigh_values(cache, elem, Hkv, kv_head, table, block_size, len, s, max_len, inv, o, D, i0, NH, 1, kv_half);
}

/* Scores of `heads` query heads (qh: [heads, D]) for the n <= block_size positions b0.. of one
   block, whose keys (of one KV head) start at k: into s[h * max_len + b0 + j]. */
static inline __attribute__((always_inline)) void block_scores(
        const float *qh, const char *k, int64_t n, int64_t b0, int64_t heads, int64_t D, int64_t elem,
        int64_t block_size, float scale, float *s, int64_t max_len, int kv_half) {
    int64_t j = 0;
    /* 8 keys at a time where the block holds 8 more rows (rows past len are read, never used); which
       path a position takes depends on the block size only, never on len or the batch. */
    for (; j + 8 <= block_size && j < n; j += 8)
        for (int64_t g = 0; g < heads; g += SCORE_HEADS) {
            const int nh = heads - g < SCORE_HEADS ? (int)(heads - g) : SCORE_HEADS;
            float dots[SCORE_HEADS * 8];
            const char *kj = k + j * D * elem;
            if (nh == 3) dot8_heads_kv(qh + g * D, kj, D, elem, kv_half, 3, scale, dots);
            else if (nh == 2) dot8_heads_kv(qh + g * D, kj, D, elem, kv_half, 2, scale, dots);
            else dot8_heads_kv(qh + g * D, kj, D, elem, kv_half, 1, scale, dots);
            for (int h = 0; h < nh; h++) {
                float *row = s + (g + h) * max_len + b0 + j;
                if (j + 8 <= n) _mm256_storeu_ps(row, _mm256_loadu_ps(dots + h * 8));
                else
                    for (int64_t r = 0; j + r < n; r++) row[r] = dots[h * 8 + r];
            }
        }
    for (; j < n; j++)
        for (int64_t g = 0; g < heads; g++)
            s[g * max_len + b0 + j] = dot_kv(qh + g * D, k + j * D * elem, D, kv_half) * scale;
}

/* Softmax of the scores of `heads` query heads of one KV head (s[h * max_len + p], p < len), then
   their weighted values into o ([heads, D]). */
static inline __attribute__((always_inline)) void softmax_values(
        const char *cache, int64_t elem, int64_t kv_head, int64_t Hkv, int64_t D, const int64_t *table,
        int64_t block_size, int64_t len, int64_t heads, float *s, int64_t max_len, float *o, int kv_half) {
    float inv[MAX_GROUP];
    for (int64_t g = 0; g < heads; g++) {  /* softmax numerators in place, and 1 / their sum */
        float *sg = s + g * max_len, m;
        int64_t pos = 0;
        __m256 m8 = _mm256_set1_ps(-INFINITY);
        for (; pos + 8 <= len; pos += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sg + pos));
        float lanes[8];
        _mm256_storeu_ps(lanes, m8);
        m = lanes[0];  /* the maximum, exact in any order */
        for (int i = 1; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
        for (; pos < len; pos++) m = sg[pos] > m ? sg[pos] : m;
        __m256 mv = _mm256_set1_ps(m), total = _mm256_setzero_ps();
        for (int64_t p = 0; p < len; p += 8) {
            __m256 e = exp8(_mm256_sub_ps(load_part(sg + p, len - p), mv));
            if (len - p < 8)  /* the zero padding of a tail must not count */
                e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                    _mm256_set1_epi32((int)(len - p)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
            total = _mm256_add_ps(total, e);
            store_part(sg + p, e, len - p);
        }
        inv[g] = 1.0f / hsum8(total);
    }
    for (int64_t g = 0; g < heads; g += V_HEADS) {  /* weighted values, V read once per V_HEADS heads */
        const int nh = heads - g < V_HEADS ? (int)(heads - g) : V_HEADS;
        const float *sg = s + g * max_len;
        if (nh == 3)
            weigh_values_for(cache, elem, Hkv, kv_head, table, block_size, len, sg, max_len, inv + g,
                             o + g * D, D, 3, kv_half);
        else if (nh == 2)
            weigh_values_for(cache, elem, Hkv, kv_head, table, block_size, len, sg, max_len, inv + g,
                             o + g * D, D, 2, kv_half);
        else
            weigh_values_for(cache, elem, Hkv, kv_head, table, block_size, len, sg, max_len, inv + g,
                             o + g * D, D, 1, kv_half);
    }
}

/* One KV head's `heads` query heads (qh, o: [heads, D]) of one query. */
static inline __attribute__((always_inline)) void attention_heads(
        const float *qh, const void *kv_cache, int64_t kv_head, int64_t Hkv, int64_t D,
        const int64_t *table, int64_t block_size, int64_t len, int64_t heads, float scale, float *s,
        int64_t max_len, float *o, int kv_half) {
    const int64_t elem = kv_half ? 2 : 4;
    const char *cache = (const char *)kv_cache;
    for (int64_t b0 = 0; b0 < len; b0 += block_size) {
        const int64_t n = len - b0 < block_size ? len - b0 : block_size;
        const char *k = cache + head_rows(table[b0 / block_size], 0, kv_head, Hkv, block_size, D) * elem;
        block_scores(qh, k, n, b0, heads, D, elem, block_size, scale, s, max_len, kv_half);
    }
    softmax_values(cache, elem, kv_head, Hkv, D, table, block_size, len, heads, s, max_len, o, kv_half);
}

/* All heads of one query (qh, o: [Hq, D]); s: Hq * max_len floats. The scores are computed block by
   block for all KV heads, so each block's keys are read as one run (Hkv * block_size * D elements)
   rather than one head's rows at a time, Hkv times the run apart. */
static inline __attribute__((always_inline)) void attention_query(
        const float *qh, const void *kv_cache, int64_t Hq, int64_t Hkv, int64_t D, const int64_t *table,
        int64_t block_size, int64_t len, float scale, float *s, int64_t max_len, float *o, int kv_half) {
    const int64_t elem = kv_half ? 2 : 4, group = Hq / Hkv;
    const char *cache = (const char *)kv_cache;
    for (int64_t b0 = 0; b0 < len; b0 += block_size) {
        const int64_t n = len - b0 < block_size ? len - b0 : block_size;
        for (int64_t kv_head = 0; kv_head < Hkv; kv_head++) {
            const char *k = cache + head_rows(table[b0 / block_size], 0, kv_head, Hkv, block_size, D) * elem;
            block_scores(qh + kv_head * group * D, k, n, b0, group, D, elem, block_size, scale,
                         s + kv_head * group * max_len, max_len, kv_half);
        }
    }
    for (int64_t kv_head = 0; kv_head < Hkv; kv_head++)
        softmax_values(cache, elem, kv_head, Hkv, D, table, block_size, len, group, s + kv_head * group * max_len,
                       max_len, o + kv_head * group * D, kv_half);
}

/* Attention of T query tokens over the paged KV cache, read in place. Query t (its heads at
   q + t * q_stride, [Hq, D]) belongs to the sequence whose block table is tables[seq[t]] (width
   table_width) and sees the first lens[t] <= max_len positions. out: [T, Hq, D]. Query heads share
   KV heads in groups of Hq / Hkv (at most MAX_GROUP); D is a multiple of 8. scores: num_threads *
   Hq * max_len floats of scratch. kv_cache: fp32, or fp16 where kv_half is 1. A head's maths is the
   same in every way of splitting the work below, so a query's bits never depend on its batch. */
void paged_attention(const float *q, int64_t q_stride, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                     const void *kv_cache, int kv_half, int64_t block_size, const int64_t *tables, int64_t table_width,
                     const int64_t *seq, const int64_t *lens, float scale, float *out, float *scores,
                     int64_t max_len, int num_threads) {
    const int64_t group = Hq / Hkv;
    if (T >= 4 * num_threads) {  /* many queries: a task per query, all its heads */
        #pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
        for (int64_t t = 0; t < T; t++) {
            float *s = scores + (int64_t)omp_get_thread_num() * Hq * max_len;
            if (kv_half)
                attention_query(q + t * q_stride, kv_cache, Hq, Hkv, D, tables + seq[t] * table_width, block_size,
                                lens[t], scale, s, max_len, out + t * Hq * D, 1);
            else
                attention_query(q + t * q_stride, kv_cache, Hq, Hkv, D, tables + seq[t] * table_width, block_size,
                                lens[t], scale, s, max_len, out + t * Hq * D, 0);
        }
        return;
    }
    /* Few queries (single-stream decode): a task per query head, else per KV head (its K/V read
       once for the group): every thread busy. */
    const int64_t split = T * Hkv < 4 * num_threads ? group : 1, heads_per_task = group / split;
    #pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < T * Hkv * split; task++) {
        const int64_t t = task / (Hkv * split), kv_head = task / split % Hkv, g0 = task % split * heads_per_task;
        const int64_t *table = tables + seq[t] * table_width;
        const float *qh = q + t * q_stride + (kv_head * group + g0) * D;
        float *s = scores + (int64_t)omp_get_thread_num() * Hq * max_len;
        float *o = out + (t * Hq + kv_head * group + g0) * D;
        if (kv_half)
            attention_heads(qh, kv_cache, kv_head, Hkv, D, table, block_size, lens[t], heads_per_task, scale, s,
                            max_len, o, 1);
        else
            attention_heads(qh, kv_cache, kv_head, Hkv, D, table, block_size, lens[t], heads_per_task, scale, s,
                            max_len, o, 0);
    }
}
