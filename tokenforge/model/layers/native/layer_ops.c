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

/* qkv: [M, (Hq + 2 * Hkv) * D], each row q heads, k heads, v heads. Rotates q and k in place by
   each token's cos/sin ([M, D / 2], the rotate-half layout), then writes k and v into kv_cache
   ([num_blocks * block_size slots, 2, Hkv, D]) at slots[r]. */
void rotary_write_kv(float *qkv, int64_t M, int64_t Hq, int64_t Hkv, int64_t D, const float *cos, const float *sin,
                     float *kv_cache, const int64_t *slots, int num_threads) {
    const int64_t half = D / 2, width = (Hq + 2 * Hkv) * D;
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
        float *slot = kv_cache + slots[r] * 2 * Hkv * D;
        memcpy(slot, row + Hq * D, 2 * Hkv * D * sizeof(float));  /* k heads then v heads: [2, Hkv, D] */
    }
}

/* q . k over D floats (a multiple of 8), fused multiply-adds in 8 lanes, the lanes summed in a fixed order. */
static inline float dot_fma(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (int64_t i = 8; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum8(acc);
}

/* Attention of T query tokens over the paged KV cache, read in place. Query t (its heads at
   q + t * q_stride, [Hq, D]) belongs to the sequence whose block table is tables[seq[t]] (width
   table_width) and sees the first lens[t] <= max_len positions. out: [T, Hq, D]. Query heads share
   KV heads in groups of Hq / Hkv (at most MAX_GROUP); D is a multiple of 8. scores: num_threads *
   Hq / Hkv * max_len floats of scratch. */
#define MAX_GROUP 16

void paged_attention(const float *q, int64_t q_stride, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                     const float *kv_cache, int64_t block_size, const int64_t *tables, int64_t table_width,
                     const int64_t *seq, const int64_t *lens, float scale, float *out, float *scores,
                     int64_t max_len, int num_threads) {
    const int64_t group = Hq / Hkv, slot_stride = 2 * Hkv * D;
    /* Few queries (single-stream decode): a task per query head, else per KV head (its K/V read
       once for the group). A head's maths is the same either way. */
    const int64_t split = T * Hkv < 4 * num_threads ? group : 1, heads_per_task = group / split;
    #pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < T * Hkv * split; task++) {
        const int64_t t = task / (Hkv * split), kv_head = task / split % Hkv, g0 = task % split * heads_per_task;
        const int64_t g1 = g0 + heads_per_task, len = lens[t];
        const int64_t *table = tables + seq[t] * table_width;
        const float *qh = q + t * q_stride + kv_head * group * D;
        float *s = scores + (int64_t)omp_get_thread_num() * group * max_len;
        for (int64_t p = 0; p < len; p++) {  /* scores, all heads of the task per key read */
            const float *k = kv_cache + (table[p / block_size] * block_size + p % block_size) * slot_stride + kv_head * D;
            for (int64_t g = g0; g < g1; g++) s[g * max_len + p] = dot_fma(qh + g * D, k, D) * scale;
        }
        float inv[MAX_GROUP];
        for (int64_t g = g0; g < g1; g++) {  /* softmax numerators in place, and 1 / their sum */
            float *sg = s + g * max_len, m = -INFINITY;
            for (int64_t p = 0; p < len; p++) m = sg[p] > m ? sg[p] : m;
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
        for (int64_t g = g0; g < g1; g++) {  /* weighted values, 64 floats of a head at a time in registers */
            const float *sg = s + g * max_len;
            float *o = out + (t * Hq + kv_head * group + g) * D;
            for (int64_t i0 = 0; i0 < D; i0 += 64) {
                const int nv = (int)((D - i0 < 64 ? D - i0 : 64) / 8);
                __m256 acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
                for (int64_t p = 0; p < len; p++) {
                    const float *v = kv_cache + (table[p / block_size] * block_size + p % block_size) * slot_stride
                                     + (Hkv + kv_head) * D + i0;
                    __m256 w = _mm256_set1_ps(sg[p]);
                    for (int j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * j), acc[j]);
                }
                for (int j = 0; j < nv; j++) _mm256_storeu_ps(o + i0 + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv[g])));
            }
        }
    }
}
