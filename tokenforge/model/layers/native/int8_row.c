/* One activation row times int8 weights on an x86-64 CPU with AVX2, for Int8Linear at one row.

Computes exactly what Int8Linear's torch path computes for that row, bit for bit: the same
per-row activation quantization (float ops in the same order, round half to even), exact int32
dot products of the int8 digits with the int8 weights (vpmaddubsw on |w| and sign-adjusted
digits: a pair sums to at most 2 * 127 * 127, no int16 saturation), then the same separately
rounded float ops. Compile without FP contraction (-ffp-contract=off) so that no a * b + c fuses.
Rows of the output are split among num_threads OpenMP threads.
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

/* sum_k w[k] * d[k] for k < K (K a multiple of 32), for the two digit rows at once. */
static void dot2(const int8_t *w, const int8_t *hi, const int8_t *lo, int64_t K, int digits,
                 int32_t *out_hi, int32_t *out_lo) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc_hi = _mm256_setzero_si256(), acc_lo = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 32) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
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

/* x: [K] fp32; weight: [N, K] int8; scales: [N]; bias: [N] or NULL; out: [N];
   work: 2 * K bytes of scratch for the digits. */
void int8_row_linear(const float *x, const int8_t *weight, const float *scales, const float *bias, float *out,
                     int64_t K, int64_t N, int digits, int8_t *work, int num_threads) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float a = fabsf(x[k]);
        amax = a > amax ? a : amax;
    }
    float x_scale = (amax < 1e-12f ? 1e-12f : amax) / 127.0f;
    int8_t *hi = work, *lo = work + K;
    for (int64_t k = 0; k < K; k++) {
        float scaled = x[k] / x_scale;
        float high = nearbyintf(scaled);
        hi[k] = (int8_t)high;
        lo[k] = (int8_t)nearbyintf((scaled - high) * 254.0f);
    }
    const float low_weight = (float)(1.0 / 254.0);
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int32_t acc_hi, acc_lo;
        dot2(weight + n * K, hi, lo, K, digits, &acc_hi, &acc_lo);
        float value = (float)acc_hi;
        if (digits == 2) {
            float low = (float)acc_lo * low_weight;
            value = value + low;
        }
        float scale = x_scale * scales[n];
        value = value * scale;
        if (bias) value = value + bias[n];
        out[n] = value;
    }
}
