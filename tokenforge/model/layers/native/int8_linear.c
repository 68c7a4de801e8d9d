/* Activation rows times int8 weights on an x86-64 CPU with AVX2, for Int8Linear.

Every function computes exactly what Int8Linear's torch path computes, bit for bit: the same
per-row activation quantization (float ops in the same order, round half to even), exact int32
dot products of the int8 digits with the int8 weights (vpmaddubsw on |w| and sign-adjusted
digits: a pair sums to at most 2 * 127 * 127, no int16 saturation), then the same separately
rounded float ops. Integer sums are exact in any order, so a row's result never depends on how
many rows ran with it. Compile without FP contraction (-ffp-contract=off) so that no a * b + c fuses.

- int8_row_linear_packed: one row (single-stream decode), output channels split among threads.
- int8_rows_linear: a few rows (up to MAX_PLAN_ROWS: decodes of a few streams, a draft's
  verification), each weight read once for all of them; for the one-call decode of DecodePlan,
  where it saves the Python around _int_mm (which is faster per multiply from ~4 rows on).
- int8_quantize_rows / int8_rescale: the steps before and after torch._int_mm for two rows or
  more (MKL's integer GEMM beats a hand-written AVX2 loop from two rows on: measured 1.5-3x at
  4-64 rows, as soon as the work is the multiplies and not the read of the weights).

4-bit weights (Int4Linear) take the same paths: a group of 32 weights is 16 bytes of 4-bit indices
and one int8 multiplier u, and weight i's int8 code is the exact integer
floor((Q4_LEVELS[index_i] * u + 64) / 128). The row kernels expand a group into its 32 codes in
registers (a lookup in the 16 codes of its u) and go on as with int8 codes;
int4_unpack writes the codes of a whole matrix for _int_mm. Same integers, so the same bits again.
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* A layer's fixed arguments, set once (ctypes converts each argument of a call: ~0.4 us apiece, and
   single-stream decode makes ~120 calls a step). Its weights: int8 codes [N, K] (weight), or 4-bit
   groups (packed [N, K / 2] indices, group_scales [N, K / 32] multipliers; weight NULL). */
struct int8_row_args {
    const int8_t *weight;
    const float *scales;
    const float *bias;
    int8_t *work;
    int64_t K, N;
    int32_t digits, num_threads;
    const uint8_t *packed;
    const int8_t *group_scales;
};

/* The codes of weights k..k+31 of output row n (q4: a constant where inlined). */
static inline __attribute__((always_inline)) __m256i load_weights(const struct int8_row_args *a, int64_t n,
                                                                   int64_t k, int q4) {
    const int64_t at = n * a->K + k;
    if (q4) return q4_group(a->packed + at / 2, a->group_scales[at / 32]);
    return _mm256_loadu_si256((const __m256i *)(a->weight + at));
}

/* sum_k w[k] * d[k] for row n's weights and k < K (K a multiple of 32), for the two digit rows at once. */
static inline __attribute__((always_inline)) void dot2(const struct int8_row_args *a, int64_t n, const int8_t *hi,
                                                       const int8_t *lo, int q4, int32_t *out_hi, int32_t *out_lo) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t K = a->K;
    const int digits = a->digits;
    __m256i acc_hi = _mm256_setzero_si256(), acc_lo = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 32) {
        __m256i wv = load_weights(a, n, k, q4);
        __m256i aw = _mm256_sign_epi8(wv, wv);
        __m256i h = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(hi + k)), wv);
        acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, h), ones));
        if (digits == 2) {
            __m256i l = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(lo + k)), wv);
            acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, l), ones));
        }
    }
    *out_hi = hsum_epi32(acc_hi);
    *out_lo = digits == 2 ? hsum_epi32(acc_lo) : 0;
}

/* Per-row quantization of x [M, K] into digits [digits * M, K] (row r's high digits at row r, its low
   digits at row M + r: torch.cat([high, low])) and x_scales [M]. */
void int8_quantize_rows(const float *x, int64_t M, int64_t K, int digits, int8_t *codes, float *x_scales,
                        int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (M * K >= 65536)
    for (int64_t r = 0; r < M; r++) {
        const float *row = x + r * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(row[k]);
            amax = a > amax ? a : amax;
        }
        float x_scale = (amax < 1e-12f ? 1e-12f : amax) / 127.0f;
        x_scales[r] = x_scale;
        int8_t *hi = codes + r * K, *lo = codes + (M + r) * K;
        for (int64_t k = 0; k < K; k++) {
            float scaled = row[k] / x_scale;
            float high = nearbyintf(scaled);
            hi[k] = (int8_t)high;
            if (digits == 2) lo[k] = (int8_t)nearbyintf((scaled - high) * 254.0f);
        }
    }
}

/* The float ops after the integer sums, for row r and output n (hi, lo: the two sums). */
static inline float rescale_one(int32_t hi, int32_t lo, int digits, float x_scale, float scale, const float *bias,
                                int64_t n) {
    float value = (float)hi;
    if (digits == 2) {
        float low = (float)lo * (float)(1.0 / 254.0);
        value = value + low;
    }
    float s = x_scale * scale;
    value = value * s;
    if (bias) value = value + bias[n];
    return value;
}

/* acc: [digits * M, N] int32 sums (the layout of int8_quantize_rows' digits times the weights);
   out: [M, N]. */
void int8_rescale(const int32_t *acc, int64_t M, int64_t N, int digits, const float *x_scales, const float *scales,
                  const float *bias, float *out, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (M * N >= 65536)
    for (int64_t r = 0; r < M; r++) {
        const int32_t *hi = acc + r * N, *lo = acc + (M + r) * N;
        for (int64_t n = 0; n < N; n++)
            out[r * N + n] = rescale_one(hi[n], digits == 2 ? lo[n] : 0, digits, x_scales[r], scales[n], bias, n);
    }
}

/* int4_unpack: the int8 codes [N, K] of 4-bit weights (for _int_mm). */
void int4_unpack(const struct int8_row_args *a, int8_t *out) {
    #pragma omp parallel for num_threads(a->num_threads) schedule(static)
    for (int64_t n = 0; n < a->N; n++)
        for (int64_t k = 0; k < a->K; k += 32)
            _mm256_storeu_si256((__m256i *)(out + n * a->K + k), load_weights(a, n, k, 1));
}

/* One row: x [K] fp32 -> out [N], output channels split among threads; a->work holds the digits. */
void int8_row_linear_packed(const float *x, float *out, const struct int8_row_args *a) {
    float x_scale;
    int8_quantize_rows(x, 1, a->K, a->digits, a->work, &x_scale, 1);
    const int8_t *hi = a->work, *lo = a->work + a->K;
    const int q4 = a->packed != NULL;
    #pragma omp parallel for num_threads(a->num_threads) schedule(static)
    for (int64_t n = 0; n < a->N; n++) {
        int32_t acc_hi, acc_lo;
        if (q4) dot2(a, n, hi, lo, 1, &acc_hi, &acc_lo);
        else dot2(a, n, hi, lo, 0, &acc_hi, &acc_lo);
        out[n] = rescale_one(acc_hi, acc_lo, a->digits, x_scale, a->scales[n], a->bias, n);
    }
}

/* The integer sums of output row n's weights with R rows of digits (row r's at hi + r * K and
   lo + r * K) into out_hi[r], out_lo[r]: the weights are read once for all R rows. R, digits and q4
   are constants where it is inlined (the 2 * R accumulators stay in registers). */
static inline __attribute__((always_inline)) void dot_rows(const struct int8_row_args *a, int64_t n,
                                                           const int8_t *hi, const int8_t *lo, int R, int digits,
                                                           int q4, int32_t *out_hi, int32_t *out_lo) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t K = a->K;
    __m256i acc_hi[4], acc_lo[4];
    for (int r = 0; r < R; r++) acc_hi[r] = acc_lo[r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 32) {
        __m256i wv = load_weights(a, n, k, q4);
        __m256i aw = _mm256_sign_epi8(wv, wv);
        for (int r = 0; r < R; r++) {
            __m256i h = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(hi + r * K + k)), wv);
            acc_hi[r] = _mm256_add_epi32(acc_hi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, h), ones));
            if (digits == 2) {
                __m256i l = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(lo + r * K + k)), wv);
                acc_lo[r] = _mm256_add_epi32(acc_lo[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, l), ones));
            }
        }
    }
    for (int r = 0; r < R; r++) {
        out_hi[r] = hsum_epi32(acc_hi[r]);
        out_lo[r] = digits == 2 ? hsum_epi32(acc_lo[r]) : 0;
    }
}

/* dot_rows for R = 1..4 rows, with R, digits and q4 as constants. */
static void dot_rows_any(const struct int8_row_args *a, int64_t n, const int8_t *hi, const int8_t *lo, int R,
                         int32_t *out_hi, int32_t *out_lo) {
    #define DOT_ROWS(r, q4) (a->digits == 2 ? dot_rows(a, n, hi, lo, r, 2, q4, out_hi, out_lo) \
                                            : dot_rows(a, n, hi, lo, r, 1, q4, out_hi, out_lo))
    #define DOT_ROWS_Q(r) (a->packed ? DOT_ROWS(r, 1) : DOT_ROWS(r, 0))
    switch (R) {
        case 1: DOT_ROWS_Q(1); break;
        case 2: DOT_ROWS_Q(2); break;
        case 3: DOT_ROWS_Q(3); break;
        default: DOT_ROWS_Q(4); break;
    }
    #undef DOT_ROWS_Q
    #undef DOT_ROWS
}

/* x: [M, K] fp32 -> out: [M, N], with a layer's fixed arguments; codes: 2 * M * K bytes and x_scales:
   M floats of scratch. The same bits as int8_quantize_rows, _int_mm and int8_rescale. */
void int8_rows_linear(const float *x, float *out, int64_t M, const struct int8_row_args *a, int8_t *codes,
                      float *x_scales) {
    const int64_t K = a->K, N = a->N;
    int8_quantize_rows(x, M, K, a->digits, codes, x_scales, a->num_threads);  /* threads from M * K >= 65536 */
    const int8_t *hi = codes, *lo = codes + M * K;
    #pragma omp parallel for num_threads(a->num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t r0 = 0; r0 < M; r0 += 4) {
            const int R = M - r0 < 4 ? (int)(M - r0) : 4;
            int32_t sums_hi[4], sums_lo[4];
            dot_rows_any(a, n, hi + r0 * K, lo + r0 * K, R, sums_hi, sums_lo);
            for (int r = 0; r < R; r++)
                out[(r0 + r) * N + n] = rescale_one(sums_hi[r], sums_lo[r], a->digits, x_scales[r0 + r], a->scales[n],
                                                    a->bias, n);
        }
    }
}
