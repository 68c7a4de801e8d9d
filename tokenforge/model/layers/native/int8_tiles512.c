/* int8_rows_linear on CPUs with AVX-512 VNNI: tiles of TILE_OUTPUTS outputs x up to TILE_ROWS rows,
with vpdpwssd for 16-bit activations (digits 2: 32 int16 products added into 16 int32 lanes in one
instruction, no saturation: the same integers as vpmaddwd + vpaddd, so the same bits) and vpdpbusd
for 8-bit ones (digits 1, w8a8: 64 products an instruction, below).
Built only where the compiler is given AVX-512 VNNI (native/__init__.py adds the flags where the CPU
has it); elsewhere HAVE_TILES512 is 0 and int8_linear.c's AVX2 loops run. One tile: 24 accumulators,
4 weight vectors and one activation vector of the 32 registers; each weight vector is converted once
for the tile's rows and each activation loaded once for its outputs.
*/
#if HAVE_TILES512

#define TILE_OUTPUTS 4
#define TILE_ROWS 6
#define ROW_BLOCK 96  /* at most this many rows' activations go through all output tiles at a time */

/* acc += the pairwise products of x and w, in place (as ACCUMULATE: gcc copies the intrinsic's result). */
#define DPWSSD(acc, x, w) __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))

/* [sum of v0's lanes, ..., sum of v3's lanes] as int64. A lane of a WIDE_CHUNK holds at most 128
   products of <= 127 * 32767 each (2048 inputs over 16 lanes), so four lanes add up within int32. */
static inline __m256i lane_sums4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
    /* each 128-bit block: [v0, v1, v2, v3], each a sum of that block's 4 lanes */
    const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    const __m512i wide = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(s)),
                                          _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s, 1)));
    return _mm256_add_epi64(_mm512_castsi512_si256(wide), _mm512_extracti64x4_epi64(wide, 1));
}

/* Output rows n..n+3 (rows past N repeat row N - 1; their sums are dropped) with R <= TILE_ROWS rows
   of activations (row r at q + r * K): sums[r] = the 4 outputs' int64 sums for row r. R and q4 are
   constants where it is inlined. */
static inline __attribute__((always_inline)) void tile512(const struct int8_row_args *a, int64_t n,
                                                          const int16_t *q, int R, int q4, __m256i *sums) {
    const int64_t K = a->K;
    int64_t rows[TILE_OUTPUTS];
    for (int o = 0; o < TILE_OUTPUTS; o++) rows[o] = n + o < a->N ? n + o : a->N - 1;
    for (int r = 0; r < R; r++) sums[r] = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < K; k0 += WIDE_CHUNK) {
        const int64_t k_end = k0 + WIDE_CHUNK < K ? k0 + WIDE_CHUNK : K;
        __m512i acc[TILE_ROWS][TILE_OUTPUTS];
        for (int r = 0; r < R; r++)
            for (int o = 0; o < TILE_OUTPUTS; o++) acc[r][o] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k_end; k += 32) {
            __m512i w[TILE_OUTPUTS];
            for (int o = 0; o < TILE_OUTPUTS; o++) w[o] = _mm512_cvtepi8_epi16(load_weights(a, rows[o], k, q4));
            for (int r = 0; r < R; r++) {
                const __m512i x = _mm512_loadu_si512((const void *)(q + r * K + k));
                for (int o = 0; o < TILE_OUTPUTS; o++) DPWSSD(acc[r][o], x, w[o]);
            }
        }
        for (int r = 0; r < R; r++)
            sums[r] = _mm256_add_epi64(sums[r], lane_sums4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    }
}

/* Digits 1 (w8a8): the activations as unsigned bytes u = q + 128 (q XOR 0x80) and vpdpbusd (64
   u8 x s8 products into 16 int32 lanes, no saturation): sum(w q) = sum(w u) - 128 sum(w), with sum(w)
   the layer's row_sums. A lane of a chunk holds at most 128 products of <= 255 * 127. DPBUSD and
   codes_to_unsigned: int8_blocks.c. */

/* The codes of weights k..k+63 of output row n; past K (K is a multiple of 32) zeros. */
static inline __attribute__((always_inline)) __m512i load_weights64(const struct int8_row_args *a, int64_t n,
                                                                     int64_t k, int q4) {
    if (k + 64 > a->K) return _mm512_zextsi256_si512(load_weights(a, n, k, q4));
    if (!q4) return _mm512_loadu_si512((const void *)(a->weight + n * a->K + k));
    return _mm512_inserti64x4(_mm512_zextsi256_si512(load_weights(a, n, k, 1)), load_weights(a, n, k + 32, 1), 1);
}

/* tile512 for digits 1: u [R, K] unsigned bytes. */
static inline __attribute__((always_inline)) void tile512_bytes(const struct int8_row_args *a, int64_t n,
                                                                const uint8_t *u, int R, int q4, __m256i *sums) {
    const int64_t K = a->K;
    int64_t rows[TILE_OUTPUTS];
    for (int o = 0; o < TILE_OUTPUTS; o++) rows[o] = n + o < a->N ? n + o : a->N - 1;
    const __m256i offsets = _mm256_slli_epi64(_mm256_setr_epi64x(a->row_sums[rows[0]], a->row_sums[rows[1]],
                                                                 a->row_sums[rows[2]], a->row_sums[rows[3]]), 7);
    for (int r = 0; r < R; r++) sums[r] = _mm256_sub_epi64(_mm256_setzero_si256(), offsets);
    for (int64_t k0 = 0; k0 < K; k0 += WIDE_CHUNK) {
        const int64_t k_end = k0 + WIDE_CHUNK < K ? k0 + WIDE_CHUNK : K;
        __m512i acc[TILE_ROWS][TILE_OUTPUTS];
        for (int r = 0; r < R; r++)
            for (int o = 0; o < TILE_OUTPUTS; o++) acc[r][o] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k_end; k += 64) {
            const __mmask64 lanes = k + 64 <= K ? ~(__mmask64)0 : (__mmask64)0xffffffff;
            __m512i w[TILE_OUTPUTS];
            for (int o = 0; o < TILE_OUTPUTS; o++) w[o] = load_weights64(a, rows[o], k, q4);
            for (int r = 0; r < R; r++) {
                const __m512i x = _mm512_maskz_loadu_epi8(lanes, u + r * K + k);
                for (int o = 0; o < TILE_OUTPUTS; o++) DPBUSD(acc[r][o], x, w[o]);
            }
        }
        for (int r = 0; r < R; r++)
            sums[r] = _mm256_add_epi64(sums[r], lane_sums4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    }
}

/* tile512 (digits 2, q int16) or tile512_bytes (digits 1, q unsigned bytes) with R and q4 as constants. */
static void tile512_any(const struct int8_row_args *a, int64_t n, const int8_t *q, int R, __m256i *sums) {
    #define TILE(r) case r: if (a->packed) tile512(a, n, (const int16_t *)q, r, 1, sums); \
                            else tile512(a, n, (const int16_t *)q, r, 0, sums); break;
    #define TILE_BYTES(r) case r: if (a->packed) tile512_bytes(a, n, (const uint8_t *)q, r, 1, sums); \
                                  else tile512_bytes(a, n, (const uint8_t *)q, r, 0, sums); break;
    if (a->digits == 2) switch (R) { TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) }
    else switch (R) { TILE_BYTES(1) TILE_BYTES(2) TILE_BYTES(3) TILE_BYTES(4) TILE_BYTES(5) TILE_BYTES(6) }
    #undef TILE_BYTES
    #undef TILE
}

/* rescale_one for outputs n..n+O-1 (O <= 4) of one row, in lanes: the same IEEE ops (int64 to float
   rounds to nearest even as (float) does; no fused multiply-add). */
static inline void rescale4(__m256i sums, float x_scale, const struct int8_row_args *a, int64_t n, int O,
                            float *out) {
    const __mmask8 lanes = (__mmask8)((1 << O) - 1);
    const __m128 s = _mm_mul_ps(_mm_set1_ps(x_scale), _mm_maskz_loadu_ps(lanes, a->scales + n));
    __m128 value = _mm_mul_ps(_mm256_cvtepi64_ps(sums), s);
    if (a->bias) value = _mm_add_ps(value, _mm_maskz_loadu_ps(lanes, a->bias + n));
    _mm_mask_storeu_ps(out, lanes, value);
}

/* out [M, N] = the rows' codes q [M, K] (int16 for digits 2, int8 for digits 1: turned into unsigned
   bytes in place; scales x_scales [M]) times the layer's weights, in equal blocks of at most ROW_BLOCK
   rows: a block's activations stay in L2 while all output tiles go through it (2048 rows of 576
   inputs: 2x the rate of one block), and the weights are read once per block (one block up to 96
   rows: a 64-row head reads its 28 MB once). */
static void tiles512_linear(float *out, int64_t M, const struct int8_row_args *a, int8_t *q,
                            const float *x_scales) {
    const int64_t K = a->K, N = a->N, row_bytes = a->digits == 2 ? 2 * K : K;
    if (a->digits == 1) codes_to_unsigned(q, M * K);  /* M * K is a multiple of 32 (int8_blocks.c) */
    const int64_t num_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t block = ((M + num_blocks - 1) / num_blocks + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    #pragma omp parallel num_threads(a->num_threads)
    for (int64_t b0 = 0; b0 < M; b0 += block) {
        const int64_t b_end = M - b0 < block ? M : b0 + block;
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n += TILE_OUTPUTS) {
            const int O = N - n < TILE_OUTPUTS ? (int)(N - n) : TILE_OUTPUTS;
            for (int64_t r0 = b0; r0 < b_end; r0 += TILE_ROWS) {
                const int R = b_end - r0 < TILE_ROWS ? (int)(b_end - r0) : TILE_ROWS;
                __m256i sums[TILE_ROWS];
                tile512_any(a, n, q + r0 * row_bytes, R, sums);
                for (int r = 0; r < R; r++) rescale4(sums[r], x_scales[r0 + r], a, n, O, out + (r0 + r) * N + n);
            }
        }
    }
}

#endif
