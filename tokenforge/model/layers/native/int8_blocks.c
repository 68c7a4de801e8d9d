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

Where the CPU has AVX-512 VNNI (HAVE_TILES512), block_pair_tile replaces the three-instruction
product with vpdpbusd (u8 x s8 products summed by four into int32 lanes, no saturation): the
activation codes as unsigned bytes u = q + 128, so that a block's sum(w q) = sum(w u) - 128 sum(w),
the last from one vpdpbusd of 0x80 bytes by each weight vector, shared by the tile's rows. The same
integers, so the same bits. It takes two groups (16 outputs) in 512-bit registers, so that each
broadcast of a row's codes serves both (1.2x at 1 row to 1.37x at 64 rows the multiply-adds per
second of one group in 256 bits), 8 rows a tile, and fetches the next pair's weights ahead.

Entered from int8_row_linear_packed and int8_rows_linear (digits == BLOCK_DIGITS), so DecodePlan
runs these layers unchanged. scratch: M * K code bytes, then M * K / QBLOCK floats.
*/

#define QBLOCK 32
#define GROUP_OUT 8
#if HAVE_TILES512
#define BLOCK_TILE_ROWS 8
#else
#define BLOCK_TILE_ROWS 4
#endif

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

#if HAVE_TILES512
/* acc += the products of u (unsigned bytes) and w (signed bytes), four to a lane, in place; 256- or
   512-bit registers (int8_tiles512.c uses it too). */
#define DPBUSD(acc, u, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(w))

/* The in-place q XOR 0x80 of n codes (n a multiple of 32): int8 codes as unsigned bytes q + 128. */
static void codes_to_unsigned(int8_t *q, int64_t n) {
    for (int64_t i = 0; i < n; i += 64) {
        const __mmask64 lanes = n - i >= 64 ? ~(__mmask64)0 : (__mmask64)0xffffffff;
        _mm512_mask_storeu_epi8(q + i, lanes, _mm512_xor_si512(_mm512_maskz_loadu_epi8(lanes, q + i),
                                                               _mm512_set1_epi8((char)0x80)));
    }
}

/* block_tile with vpdpbusd, for the two groups g and g + 1 (16 adjacent outputs; g alone, in both
   halves, where pair is 0) in 512-bit registers: each row's four codes are broadcast once for both
   groups' weights. u holds the rows' codes as unsigned bytes (codes_to_unsigned), so each block's
   sums are corrected by the offset sum(0x80 * w); the same integers as block_tile's, and per lane
   the same float ops in the same order, so the same bits. */
static inline __attribute__((always_inline)) void block_pair_tile(const struct int8_row_args *a, int64_t g,
                                                                  int pair, const uint8_t *u, const float *x_scales,
                                                                  int R, const int8_t *next, __m512 *acc) {
    const int64_t K = a->K, num_blocks = K / QBLOCK;
    const int8_t *w0 = a->weight + g * GROUP_OUT * K, *w1 = pair ? w0 + GROUP_OUT * K : w0;
    const __m512i bytes128 = _mm512_set1_epi8((char)0x80);
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < num_blocks; b++) {
        __m512i sums[BLOCK_TILE_ROWS], offset = _mm512_setzero_si512();
        for (int r = 0; r < R; r++) sums[r] = _mm512_setzero_si512();
        if (next)  /* the next pair's block b (4 cache lines a group), from memory while this one computes */
            for (int line = 0; line < QBLOCK * GROUP_OUT; line += 64) {
                _mm_prefetch((const char *)next + b * QBLOCK * GROUP_OUT + line, _MM_HINT_T0);
                _mm_prefetch((const char *)next + (num_blocks + b) * QBLOCK * GROUP_OUT + line, _MM_HINT_T0);
            }
        for (int j = 0; j < QBLOCK / 4; j++) {
            const int64_t at = (b * QBLOCK + 4 * j) * GROUP_OUT;
            const __m256i low = _mm256_loadu_si256((const __m256i *)(w0 + at));
            const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(low),
                                                  _mm256_loadu_si256((const __m256i *)(w1 + at)), 1);
            DPBUSD(offset, bytes128, wv);
            for (int r = 0; r < R; r++) {
                int32_t four;
                __builtin_memcpy(&four, u + r * K + b * QBLOCK + 4 * j, 4);
                DPBUSD(sums[r], _mm512_set1_epi32(four), wv);
            }
        }
        for (int r = 0; r < R; r++) {
            const __m512 x_scale = _mm512_set1_ps(x_scales[r * num_blocks + b]);
            const __m512i isum = _mm512_sub_epi32(sums[r], offset);
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_cvtepi32_ps(isum), x_scale));
        }
    }
}

/* block_pair_tile with R as a constant. */
static void block_pair_tile_any(const struct int8_row_args *a, int64_t g, int pair, const int8_t *q,
                                const float *x_scales, int R, const int8_t *next, __m512 *acc) {
    #define TILE(r) case r: block_pair_tile(a, g, pair, (const uint8_t *)q, x_scales, r, next, acc); break;
    switch (R) { TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) default: TILE(8) }
    #undef TILE
}
#endif

/* block_tile with R as a constant. */
static void block_tile_any(const struct int8_row_args *a, int64_t g, const int8_t *q, const float *x_scales, int R,
                           __m256 *acc) {
    #define TILE(r) case r: block_tile(a, g, q, x_scales, r, acc); break;
    switch (R) { TILE(1) TILE(2) TILE(3) default: TILE(4) }
    #undef TILE
}

/* x: [M, K] fp32 -> out: [M, N]; N a multiple of GROUP_OUT, K of QBLOCK. */
static void blocks_linear(const float *x, float *out, int64_t M, const struct int8_row_args *a, int8_t *scratch) {
    const int64_t K = a->K, N = a->N, num_blocks = K / QBLOCK;
    float *x_scales = (float *)(scratch + M * K);  /* M * K is a multiple of 32: aligned as float */
    /* each block as a row of its own: the same codes and scales as one scale per block */
    int8_quantize_rows(x, M * num_blocks, QBLOCK, 1, scratch, x_scales, a->num_threads);
#if HAVE_TILES512
    codes_to_unsigned(scratch, M * K);
    /* pairs of groups (an odd last group alone), each thread its run of them */
    const int64_t num_groups = N / GROUP_OUT, num_units = (num_groups + 1) / 2;
    #pragma omp parallel for num_threads(a->num_threads) schedule(static)
    for (int64_t unit = 0; unit < num_units; unit++) {
        const int64_t g = 2 * unit;
        const int pair = g + 1 < num_groups;
        const __mmask16 lanes = pair ? 0xffff : 0xff;
        const __m512 scales = _mm512_maskz_loadu_ps(lanes, a->scales + g * GROUP_OUT);
        const __m512 bias = a->bias ? _mm512_maskz_loadu_ps(lanes, a->bias + g * GROUP_OUT) : _mm512_setzero_ps();
        for (int64_t r0 = 0; r0 < M; r0 += BLOCK_TILE_ROWS) {
            const int R = M - r0 < BLOCK_TILE_ROWS ? (int)(M - r0) : BLOCK_TILE_ROWS;
            __m512 acc[BLOCK_TILE_ROWS];
            /* the first row tile fetches the next pair's weights ahead (the thread's next unit) */
            const int8_t *next = r0 == 0 && g + 3 < num_groups ? a->weight + (g + 2) * GROUP_OUT * K : NULL;
            block_pair_tile_any(a, g, pair, scratch + r0 * K, x_scales + r0 * num_blocks, R, next, acc);
            for (int r = 0; r < R; r++) {
                __m512 value = _mm512_mul_ps(acc[r], scales);
                if (a->bias) value = _mm512_add_ps(value, bias);
                _mm512_mask_storeu_ps(out + (r0 + r) * N + g * GROUP_OUT, lanes, value);
            }
        }
    }
#else
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
#endif
}
