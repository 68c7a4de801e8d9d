/* Activation rows times int8 weights on an x86-64 CPU with AVX2, for Int8Linear (where the CPU has
AVX-512 VNNI, the two row functions below hand over to int8_tiles512.c after quantizing).

Every function computes exactly what Int8Linear's torch path computes, bit for bit: the same
per-row activation quantization (float ops in the same order, round half to even), an exact integer
dot product of the quantized activations with the int8 weights, then the same separately rounded
float ops. Integer sums are exact in any order, so a row's result never depends on how many rows
ran with it. Compile without FP contraction (-ffp-contract=off) so that no a * b + c fuses.

Activations, per row (digits is the layer's activation_digits):
- digits 2 (int8 layers): q = round(x / s), s = amax / 32767, a 16-bit integer. The C kernels
  multiply q as int16 by the sign-extended weights (vpmaddwd: one multiply instruction per 16
  products; int32 lanes widened to int64 every 2048 inputs, so no sum can overflow). For
  torch._int_mm (int8 only) q is split into two bytes, q = 256 hi + (lo + 128), and the sum is
  256 sum(w hi) + sum(w lo) + 128 sum(w): row_sums holds sum(w) per output.
- digits 1 (w8a8): q = round(x / s), s = amax / 127, one int8; vpmaddubsw on |w| and the
  sign-adjusted q (a pair sums to at most 2 * 127 * 127: no int16 saturation).
The float ops after the sum: value = (float)sum; value = value * (x_scale * scale); + bias.

- int8_row_linear_packed: one row (single-stream decode), output channels split among threads.
- int8_rows_linear: any number of rows; the one-call decode of DecodePlan and, where torch._int_mm
  is slow (int_mm_is_faster), every call. Up to PASS_ROWS rows go in one pass over the weights, each
  weight vector loaded once for all of them (a few rows are bound by reading the weights from memory,
  and one output row at a time reads them fastest); more rows go in tiles of BLOCK_OUTPUTS outputs x
  BLOCK_ROWS rows, each weight loaded once per tile's rows and each activation once per tile's
  outputs (many rows are bound by the multiplies: 1.3x-1.6x the rate of output-at-a-time here).
- int8_quantize_rows / int8_rescale: the steps before and after torch._int_mm.

4-bit weights (Int4Linear) take the same paths: a group of 32 weights is 16 bytes of 4-bit indices
and one int8 multiplier u, and weight i's int8 code is the exact integer
floor((Q4_LEVELS[index_i] * u + 64) / 128) (int4_codes.c). The row kernels expand a group into its
32 codes in registers and go on as with int8 codes; int4_unpack writes the codes of a whole matrix
for _int_mm. Same integers, so the same bits again.
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define WIDE_CHUNK 2048  /* inputs summed in int32 lanes before widening: 64 steps of <= 2 * 2 * 127 * 32767 */
#define PASS_ROWS 8  /* int8_rows_linear: up to this many rows in one pass */
#define BLOCK_OUTPUTS 3  /* more rows: tiles of 3 outputs x 4 rows (12 accumulators of the 16 registers) */
#define BLOCK_ROWS 4

/* AVX-512 VNNI tiles (int8_tiles512.c) for both activation kinds where the compiler is given them. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define HAVE_TILES512 1
#else
#define HAVE_TILES512 0
#endif

/* acc += p in place: gcc otherwise adds into a new register and copies it back each step (1.3x slower). */
#define ACCUMULATE(acc, p) __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(p))

static int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static int64_t hsum_epi32_wide(__m256i v) {
    __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                    _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* A layer's fixed arguments, set once (ctypes converts each argument of a call: ~0.4 us apiece, and
   single-stream decode makes ~120 calls a step). Its weights: int8 codes [N, K] (weight), or 4-bit
   groups (packed [N, K / 2] indices, group_scales [N, K / 32] multipliers; weight NULL). work: K
   int16 of scratch for one row's activations. */
struct int8_row_args {
    const int8_t *weight;
    const float *scales;
    const float *bias;
    int8_t *work;
    int64_t K, N;
    int32_t digits, num_threads;
    const uint8_t *packed;
    const int8_t *group_scales;
    const int32_t *row_sums;  /* digits 1: the sum of each output's codes [N] (the AVX-512 tiles' offset) */
};

#define BLOCK_DIGITS 3  /* a w8a8-block layer (int8_blocks.c): activations in blocks of 32, each with its scale */
static void blocks_linear(const float *x, float *out, int64_t M, const struct int8_row_args *a,
                          int8_t *scratch);  /* int8_blocks.c */

#if HAVE_TILES512
static void tiles512_linear(float *out, int64_t M, const struct int8_row_args *a, int8_t *q,
                            const float *x_scales);  /* int8_tiles512.c */
#endif

/* The codes of weights k..k+31 of output row n (q4: a constant where inlined). */
static inline __attribute__((always_inline)) __m256i load_weights(const struct int8_row_args *a, int64_t n,
                                                                   int64_t k, int q4) {
    const int64_t at = n * a->K + k;
    if (q4) return q4_group(a->packed + at / 2, a->group_scales[at / 32]);
    return _mm256_loadu_si256((const __m256i *)(a->weight + at));
}

/* max |row[k]|, NaNs skipped: max is exact, so lanes give the serial loop's value. */
static float row_amax(const float *row, int64_t K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 lanes_max = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)  /* maxps returns its second operand where the first is NaN */
        lanes_max = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(row + k)), lanes_max);
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, lanes_max);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    for (; k < K; k++) {
        const float a = fabsf(row[k]);
        amax = a > amax ? a : amax;
    }
    return amax;
}

/* round(row[k] / x_scale) for k = k..k+7 (division and round half to even, as nearbyintf). */
static inline __m256i quantize8(const float *row, __m256 x_scale) {
    const __m256 q = _mm256_div_ps(_mm256_loadu_ps(row), x_scale);
    return _mm256_cvtps_epi32(_mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* Per-row quantization of x [M, K] (see the comment at the top). mode 1: one int8 digit into
   codes [M, K]; mode 2: the two bytes for _int_mm into codes [2 M, K] (row r's hi at row r, its lo
   at row M + r); mode 3: int16 into codes [M, K] int16. x_scales [M]. */
void int8_quantize_rows(const float *x, int64_t M, int64_t K, int mode, int8_t *codes, float *x_scales,
                        int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (M * K >= 65536)
    for (int64_t r = 0; r < M; r++) {
        const float *row = x + r * K;
        const float amax = row_amax(row, K);
        float x_scale = (amax < 1e-12f ? 1e-12f : amax) / (mode == 1 ? 127.0f : 32767.0f);
        x_scales[r] = x_scale;
        int8_t *hi = codes + r * K, *lo = codes + (M + r) * K;
        int16_t *wide = (int16_t *)codes + r * K;
        int64_t k = 0;
        if (mode != 2) {
            const __m256 scale = _mm256_set1_ps(x_scale);
            for (; k + 16 <= K; k += 16) {  /* |q| <= 32767: the packs do not saturate */
                __m256i q = _mm256_packs_epi32(quantize8(row + k, scale), quantize8(row + k + 8, scale));
                q = _mm256_permute4x64_epi64(q, 0xd8);  /* packs works within 128-bit lanes */
                if (mode == 3) _mm256_storeu_si256((__m256i *)(wide + k), q);
                else _mm_storeu_si128((__m128i *)(hi + k), _mm_packs_epi16(_mm256_castsi256_si128(q),
                                                                           _mm256_extracti128_si256(q, 1)));
            }
        }
        for (; k < K; k++) {
            const int q = (int)nearbyintf(row[k] / x_scale);
            if (mode == 1) hi[k] = (int8_t)q;
            else if (mode == 3) wide[k] = (int16_t)q;
            else hi[k] = (int8_t)(q >> 8), lo[k] = (int8_t)((q & 255) - 128);
        }
    }
}

/* The float ops after the integer sum, for output n. */
static inline float rescale_one(int64_t sum, float x_scale, float scale, const float *bias, int64_t n) {
    float value = (float)sum;
    float s = x_scale * scale;
    value = value * s;
    if (bias) value = value + bias[n];
    return value;
}

/* acc: [digits * M, N] int32 sums of _int_mm over int8_quantize_rows' codes (mode = digits);
   row_sums: [N] (digits 2); out: [M, N]. */
void int8_rescale(const int32_t *acc, int64_t M, int64_t N, int digits, const float *x_scales, const float *scales,
                  const int32_t *row_sums, const float *bias, float *out, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (M * N >= 65536)
    for (int64_t r = 0; r < M; r++) {
        const int32_t *hi = acc + r * N, *lo = acc + (M + r) * N;
        for (int64_t n = 0; n < N; n++) {
            const int64_t sum = digits == 2 ? 256 * (int64_t)hi[n] + lo[n] + 128 * (int64_t)row_sums[n] : hi[n];
            out[r * N + n] = rescale_one(sum, x_scales[r], scales[n], bias, n);
        }
    }
}

/* int4_unpack: the int8 codes [N, K] of 4-bit weights (for _int_mm). */
void int4_unpack(const struct int8_row_args *a, int8_t *out) {
    #pragma omp parallel for num_threads(a->num_threads) schedule(static)
    for (int64_t n = 0; n < a->N; n++)
        for (int64_t k = 0; k < a->K; k += 32)
            _mm256_storeu_si256((__m256i *)(out + n * a->K + k), load_weights(a, n, k, 1));
}

/* The sums of output row n's weights with R rows of activations (row r's at q + r * K, int16 for
   digits 2, int8 for digits 1) into out[r], R <= PASS_ROWS: the weights are loaded once for all R
   rows. R, digits and q4 are constants where it is inlined (the R accumulators stay in registers). */
static inline __attribute__((always_inline)) void dot_rows(const struct int8_row_args *a, int64_t n,
                                                           const int8_t *q, int R, int digits, int q4,
                                                           int64_t *out) {
    const int64_t K = a->K;
    __m256i acc[PASS_ROWS];
    for (int r = 0; r < R; r++) out[r] = 0;
    if (digits == 1) {
        const __m256i ones = _mm256_set1_epi16(1);
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
        for (int64_t k = 0; k < K; k += 32) {
            __m256i wv = load_weights(a, n, k, q4);
            __m256i aw = _mm256_sign_epi8(wv, wv);
            for (int r = 0; r < R; r++) {
                __m256i h = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(q + r * K + k)), wv);
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, h), ones));
            }
        }
        for (int r = 0; r < R; r++) out[r] = hsum_epi32(acc[r]);
        return;
    }
    const int16_t *wide = (const int16_t *)q;
    for (int64_t k0 = 0; k0 < K; k0 += WIDE_CHUNK) {
        const int64_t k_end = k0 + WIDE_CHUNK < K ? k0 + WIDE_CHUNK : K;
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k_end; k += 32) {
            __m256i wv = load_weights(a, n, k, q4);
            __m256i w_low = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(wv));
            __m256i w_high = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(wv, 1));
            for (int r = 0; r < R; r++) {
                const int16_t *row = wide + r * K + k;
                ACCUMULATE(acc[r], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)row), w_low));
                ACCUMULATE(acc[r], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(row + 16)), w_high));
            }
        }
        for (int r = 0; r < R; r++) out[r] += hsum_epi32_wide(acc[r]);
    }
}

/* dot_rows for R = 1..PASS_ROWS rows, with R, digits and q4 as constants. */
static void dot_rows_any(const struct int8_row_args *a, int64_t n, const int8_t *q, int R, int64_t *out) {
    #define DOT_ROWS(r, q4) (a->digits == 2 ? dot_rows(a, n, q, r, 2, q4, out) : dot_rows(a, n, q, r, 1, q4, out))
    #define DOT_ROWS_Q(r) case r: if (a->packed) DOT_ROWS(r, 1); else DOT_ROWS(r, 0); break;
    switch (R) { DOT_ROWS_Q(1) DOT_ROWS_Q(2) DOT_ROWS_Q(3) DOT_ROWS_Q(4) DOT_ROWS_Q(5) DOT_ROWS_Q(6) DOT_ROWS_Q(7)
                 DOT_ROWS_Q(8) }
    #undef DOT_ROWS_Q
    #undef DOT_ROWS
}

/* The sums of O <= BLOCK_OUTPUTS output rows n.. with R <= BLOCK_ROWS rows of 16-bit activations (row r
   at q + r * K) into out[o * BLOCK_ROWS + r]: each weight is loaded once for the R rows, each activation
   once for the O outputs. O, R and q4 are constants where it is inlined. */
static inline __attribute__((always_inline)) void dot_block(const struct int8_row_args *a, int64_t n,
                                                            const int16_t *q, int O, int R, int q4, int64_t *out) {
    const int64_t K = a->K;
    __m256i acc[BLOCK_OUTPUTS][BLOCK_ROWS];
    int8_t groups[BLOCK_OUTPUTS][32] __attribute__((aligned(32)));  /* q4: a step's codes, expanded */
    for (int i = 0; i < BLOCK_OUTPUTS * BLOCK_ROWS; i++) out[i] = 0;
    for (int64_t k0 = 0; k0 < K; k0 += WIDE_CHUNK) {
        const int64_t k_end = k0 + WIDE_CHUNK < K ? k0 + WIDE_CHUNK : K;
        for (int o = 0; o < O; o++)
            for (int r = 0; r < R; r++) acc[o][r] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k_end; k += 16) {
            const int8_t *codes[BLOCK_OUTPUTS];
            for (int o = 0; o < O; o++) {
                if (q4 && (k & 31) == 0) _mm256_store_si256((__m256i *)groups[o], load_weights(a, n + o, k, 1));
                codes[o] = q4 ? groups[o] + (k & 31) : a->weight + (n + o) * K + k;
            }
            __m256i w[BLOCK_OUTPUTS];
            for (int o = 0; o < O; o++) w[o] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)codes[o]));
            for (int r = 0; r < R; r++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(q + r * K + k));
                for (int o = 0; o < O; o++) ACCUMULATE(acc[o][r], _mm256_madd_epi16(x, w[o]));
            }
        }
        for (int o = 0; o < O; o++)
            for (int r = 0; r < R; r++) out[o * BLOCK_ROWS + r] += hsum_epi32_wide(acc[o][r]);
    }
}

/* dot_block with O, R and q4 as constants. */
static void dot_block_any(const struct int8_row_args *a, int64_t n, const int16_t *q, int O, int R, int64_t *out) {
    #define DOT_BLOCK(o, r) case o * 8 + r: if (a->packed) dot_block(a, n, q, o, r, 1, out); \
                                            else dot_block(a, n, q, o, r, 0, out); break;
    switch (O * 8 + R) {
        DOT_BLOCK(1, 1) DOT_BLOCK(1, 2) DOT_BLOCK(1, 3) DOT_BLOCK(1, 4) DOT_BLOCK(2, 1) DOT_BLOCK(2, 2)
        DOT_BLOCK(2, 3) DOT_BLOCK(2, 4) DOT_BLOCK(3, 1) DOT_BLOCK(3, 2) DOT_BLOCK(3, 3) DOT_BLOCK(3, 4)
    }
    #undef DOT_BLOCK
}

/* One row: x [K] fp32 -> out [N], output channels split among threads; a->work holds the activations. */
void int8_row_linear_packed(const float *x, float *out, const struct int8_row_args *a) {
    if (a->digits == BLOCK_DIGITS) {  /* a->work: 2 K bytes, the block codes and scales need 1.125 K */
        blocks_linear(x, out, 1, a, a->work);
        return;
    }
    float x_scale;
    int8_quantize_rows(x, 1, a->K, a->digits == 2 ? 3 : 1, a->work, &x_scale, 1);
#if HAVE_TILES512
    tiles512_linear(out, 1, a, a->work, &x_scale);
    return;
#endif
    #pragma omp parallel for num_threads(a->num_threads) schedule(static)
    for (int64_t n = 0; n < a->N; n++) {
        int64_t sum;
        dot_rows_any(a, n, a->work, 1, &sum);
        out[n] = rescale_one(sum, x_scale, a->scales[n], a->bias, n);
    }
}

/* x: [M, K] fp32 -> out: [M, N], with a layer's fixed arguments; codes: 2 * M * K bytes and x_scales:
   M floats of scratch. The same bits as int8_quantize_rows, _int_mm and int8_rescale. */
void int8_rows_linear(const float *x, float *out, int64_t M, const struct int8_row_args *a, int8_t *codes,
                      float *x_scales) {
    const int64_t K = a->K, N = a->N;
    const int64_t row_bytes = a->digits == 2 ? 2 * K : K;
    if (a->digits == BLOCK_DIGITS) {  /* codes: 2 M K bytes, the block codes and scales need 1.125 M K */
        blocks_linear(x, out, M, a, codes);
        return;
    }
    int8_quantize_rows(x, M, K, a->digits == 2 ? 3 : 1, codes, x_scales, a->num_threads);  /* threads if large */
#if HAVE_TILES512
    tiles512_linear(out, M, a, codes, x_scales);
    return;
#endif
    if (a->digits == 2 && M > PASS_ROWS) {
        #pragma omp parallel for num_threads(a->num_threads) schedule(static)
        for (int64_t n = 0; n < N; n += BLOCK_OUTPUTS) {
            const int O = N - n < BLOCK_OUTPUTS ? (int)(N - n) : BLOCK_OUTPUTS;
            for (int64_t r0 = 0; r0 < M; r0 += BLOCK_ROWS) {
                const int R = M - r0 < BLOCK_ROWS ? (int)(M - r0) : BLOCK_ROWS;
                int64_t sums[BLOCK_OUTPUTS * BLOCK_ROWS];
                dot_block_any(a, n, (const int16_t *)(codes + r0 * row_bytes), O, R, sums);
                for (int o = 0; o < O; o++)
                    for (int r = 0; r < R; r++)
                        out[(r0 + r) * N + n + o] = rescale_one(sums[o * BLOCK_ROWS + r], x_scales[r0 + r],
                                                                a->scales[n + o], a->bias, n + o);
            }
        }
        return;
    }
    #pragma omp parallel for num_threads(a->num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t r0 = 0; r0 < M; r0 += PASS_ROWS) {
            const int R = M - r0 < PASS_ROWS ? (int)(M - r0) : PASS_ROWS;
            int64_t sums[PASS_ROWS];
            dot_rows_any(a, n, codes + r0 * row_bytes, R, sums);
            for (int r = 0; r < R; r++)
                out[(r0 + r) * N + n] = rescale_one(sums[r], x_scales[r0 + r], a->scales[n], a->bias, n);
        }
    }
}
