/* 4-bit weight groups (Int4Linear, quant_int4.py), on an x86-64 CPU with AVX2.

A group of 32 weights of one output row is 16 bytes of 4-bit indices (byte j: weight j's index in
its low nibble, weight j + 16's in its high one) and one int8 multiplier u. Weight i's int8 code is
floor((Q4_LEVELS[index_i] * u + 64) / 128), |code| <= 127; the weight is its code times the row's
fp32 scale. int8_linear.c multiplies the codes exactly as it multiplies int8 weights.

- q4_group: a group's 32 codes in a register (a lookup in the 16 codes of its u, from a 4 KB table).
- int4_quantize: fp32 weights -> indices, multipliers and row scales. The row scale maps the row's
  largest weight to 127; per group, u is tried around the one that maps the group's largest weight
  to Q4_LEVELS[0], each weight takes its nearest code, and the u of least squared error is kept.
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static const int Q4_LEVELS[16] = {-127, -111, -95, -79, -64, -48, -32, -16, 0, 16, 32, 48, 64, 79, 95, 111};

/* The 16 codes of every multiplier u (row u + 128), filled when the library loads. */
static int8_t q4_codes[256][16] __attribute__((aligned(16)));

static int floor_div128(int v) { return v >= 0 ? v / 128 : -((-v + 127) / 128); }

__attribute__((constructor)) static void fill_q4_codes(void) {
    for (int u = -128; u < 128; u++)
        for (int j = 0; j < 16; j++) q4_codes[u + 128][j] = (int8_t)floor_div128(Q4_LEVELS[j] * u + 64);
}

static inline __m256i q4_group(const uint8_t *packed, int8_t u) {
    const __m256i codes = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)q4_codes[u + 128]));
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)packed));
    const __m256i index = _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                                           _mm256_set1_epi8(15));
    return _mm256_shuffle_epi8(codes, index);
}

#define Q4_GROUP 32
#define Q4_TRIES 2  /* u from ideal - Q4_TRIES to ideal + Q4_TRIES */

/* The index of the code nearest x among the 16 codes of u (ties: the lower index). The codes are
   ~15.9 u / 128 apart and off that line by at most 1: for |u| >= 8 the nearest is within 2 of the
   line's index; smaller steps are searched whole. */
static inline int nearest_code(const int8_t *codes, int u, float per_index, float x) {
    int first = 0, last = 15;
    if (u >= 8 || u <= -8) {
        const int guess = (int)floorf(x * per_index + 8.5f);
        first = guess - 2 < 0 ? 0 : guess - 2;
        last = guess + 2 > 15 ? 15 : guess + 2;
        if (first > 15) first = 15;
        if (last < 0) last = 0;
    }
    int best = first;
    float best_distance = fabsf(x - codes[first]);
    for (int j = first + 1; j <= last; j++) {
        float distance = fabsf(x - codes[j]);
        if (distance < best_distance) best = j, best_distance = distance;
    }
    return best;
}

/* weight: [N, K] fp32 (K a multiple of 32) -> packed [N, K / 2], multipliers [N, K / 32], scales [N]. */
void int4_quantize(const float *weight, int64_t N, int64_t K, uint8_t *packed, int8_t *multipliers, float *scales,
                   int num_threads) {
    #pragma omp parallel for num_threads(num_threads) schedule(dynamic, 16)
    for (int64_t n = 0; n < N; n++) {
        const float *row = weight + n * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
        const float scale = fmaxf(amax, 1e-12f) / 127.0f;
        scales[n] = scale;
        for (int64_t g = 0; g < K / Q4_GROUP; g++) {
            float x[Q4_GROUP], largest = 0.0f;
            for (int i = 0; i < Q4_GROUP; i++) {
                x[i] = row[g * Q4_GROUP + i] / scale;
                if (fabsf(x[i]) > fabsf(largest)) largest = x[i];
            }
            const int ideal = (int)nearbyintf(largest * 128.0f / (float)Q4_LEVELS[0]);
            float best_error = INFINITY;
            int best_u = 0;
            uint8_t best_index[Q4_GROUP];
            for (int u = ideal - Q4_TRIES; u <= ideal + Q4_TRIES; u++) {
                if (u < -128 || u > 127) continue;
                const int8_t *codes = q4_codes[u + 128];
                const float per_index = u == 0 ? 0.0f : 128.0f / (15.875f * (float)u);
                uint8_t index[Q4_GROUP];
                float error = 0.0f;
                for (int i = 0; i < Q4_GROUP; i++) {
                    index[i] = (uint8_t)nearest_code(codes, u, per_index, x[i]);
                    const float d = x[i] - codes[index[i]];
                    error += d * d;
                }
                if (error < best_error) {
                    best_error = error, best_u = u;
                    for (int i = 0; i < Q4_GROUP; i++) best_index[i] = index[i];
                }
            }
            multipliers[n * (K / Q4_GROUP) + g] = (int8_t)best_u;
            uint8_t *out = packed + n * (K / 2) + g * (Q4_GROUP / 2);
            for (int j = 0; j < Q4_GROUP / 2; j++) out[j] = (uint8_t)(best_index[j] | (best_index[j + 16] << 4));
        }
    }
}
