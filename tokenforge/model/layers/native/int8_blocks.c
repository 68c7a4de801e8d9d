/* w8a8-block layers (Int8BlockLinear, quant_block.py): int8 weights with one scale per output
channel times activations quantized to int8 per block of QBLOCK inputs, each block with its own
scale (llama.cpp's Q8_0 activations): 8-bit activations keep SmolLM2's perplexity within 1% of fp32
this way, where one scale per row cost ~5%; and 8-bit products run on vpmaddubsw, 32 a multiply
instruction where the 16-bit activations of int8 layers get 16 from vpmaddwd.

Weights are stored interleaved, GROUP_OUT outputs at a time: the 32 bytes at step j of group g
are the codes of inputs 4j..4j+3 of outputs 8g..8g+7 ([N / 8, K / 4, 8, 4]). One vpmaddubsw +
vpmaddwd on them and 4 activation bytes broadcast gives 8 outputs' sums of 4 products, in lanes, so
a block's exact integer sum per output needs no horizontal addition. Per row and output:

    acc = 0; for each block b: acc = acc + (float)isum_b * x_scale_b;  out = acc * scale (+ bias)

with separately rounded float ops in block order: Int8BlockLinear._forward_torch computes the same
bits, for any number of rows. Activations: x_scale_b = max(amax_b, 1e-12) / 127, q = round(x /
x_scale_b) (half to even); vpmaddubsw takes |w| and q with w's sign (a pair sums to at most
2 * 127 * 127: no int16 saturation).

Entered from int8_row_linear_packed and int8_rows_linear (digits == BLOCK_DIGITS), so DecodePlan
runs these layers unchanged. scratch: M * K code bytes, then M * K / QBLOCK floats.
*/

#define QBLOCK 32
#define GROUP_OUT 8
#define BLOCK_TILE_ROWS 4

/* The block-scaled sums of group g's 8 outputs with R <= BLOCK_TILE_ROWS rows (row r's codes at q + r * K,
   its scales at x_scales + r * K / QBLOCK) into acc[r]. R is a constant where it is inlined. */
static inline __attribute__((always_inline)) void block_tile(const struct int8_row_args *a, int64_t g,
                                                             const int8_t *q, const float *x_scales, int R,
                                                             __m256 *acc) {
    const int64_t K = a->K, num_blocks = K / QBLOCK;
    const int8_t *w = a->weight + g * GROUP_OUT * K;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < num_blocks; b++) {
        __m256i sums[BLOCK_TILE_ROWS];
        for (int r = 0; r < R; r++) sums[r] = _mm256_setzero_si256();
        for (int j = 0; j < QBLOCK / 4; j++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (b * QBLOCK + 4 * j) * GROUP_OUT));
            const __m256i aw = _mm256_sign_epi8(wv, wv);
            for (int r = 0; r < R; r++) {
                int32_t four;
                __builtin_memcpy(&four, q + r * K + b * QBLOCK + 4 * j, 4);
                const __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(four), wv);
                ACCUMULATE(sums[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones));
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256 x_scale = _mm256_set1_ps(x_scales[r * num_blocks + b]);
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_cvtepi32_ps(sums[r]), x_scale));
        }
    }
}

static void block_tile_any(const struct int8_row_args *a, int64_t g, const int8_t *q, const float *x_scales, int R,
                           __m256 *acc) {
    switch (R) {
        case 1: block_tile(a, g, q, x_scales, 1, acc); break;
        case 2: block_tile(a, g, q, x_scales, 2, acc); break;
        case 3: block_tile(a, g, q, x_scales, 3, acc); break;
        default: block_tile(a, g, q, x_scales, 4, acc); break;
    }
}

/* x: [M, K] fp32 -> out: [M, N]; N a multiple of GROUP_OUT, K of QBLOCK. */
static void blocks_linear(const float *x, float *out, int64_t M, const struct int8_row_args *a, int8_t *scratch) {
    const int64_t K = a->K, N = a->N, num_blocks = K / QBLOCK;
    float *x_scales = (float *)(scratch + M * K);  /* M * K is a multiple of 32: aligned as float */
    /* each block as a row of its own: the same codes and scales as one scale per block */
    int8_quantize_rows(x, M * num_blocks, QBLOCK, 1, scratch, x_scales, a->num_threads);
    #pragma omp parallel for num_threads(a->num_threads) schedule(static)
    for (int64_t g = 0; g < N / GROUP_OUT; g++) {
        const __m256 scales = _mm256_loadu_ps(a->scales + g * GROUP_OUT);
        const __m256 bias = a->bias ? _mm256_loadu_ps(a->bias + g * GROUP_OUT) : _mm256_setzero_ps();
        for (int64_t r0 = 0; r0 < M; r0 += BLOCK_TILE_ROWS) {
            const int R = M - r0 < BLOCK_TILE_ROWS ? (int)(M - r0) : BLOCK_TILE_ROWS;
            __m256 acc[BLOCK_TILE_ROWS];
            block_tile_any(a, g, scratch + r0 * K, x_scales + r0 * num_blocks, R, acc);
            for (int r = 0; r < R; r++) {
                __m256 value = _mm256_mul_ps(acc[r], scales);
                if (a->bias) value = _mm256_add_ps(value, bias);
                _mm256_storeu_ps(out + (r0 + r) * N + g * GROUP_OUT, value);
            }
        }
    }
}
