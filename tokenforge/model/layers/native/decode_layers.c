/* Decode of a few tokens (up to MAX_PLAN_ROWS: a few streams, a draft's verification): all decoder
layers of a Llama-family model with int8 linear layers, in one call. It calls the same functions, in
the same order and with the same arguments, as the Python path calls one by one (int8_linear.c and
layer_ops.c, compiled into the same library); its linear layers' integer sums are exact like
_int_mm's, so a token gets exactly the bits it would get there, or inside any batch. What it saves
is ~100 us of Python, ctypes and torch per layer.
*/

struct decode_layer {
    const float *input_norm, *post_norm;  /* RMSNorm weights [H] */
    const struct int8_row_args *qkv, *o, *gate_up, *down;
};

struct decode_model {
    const struct decode_layer *layers;
    int64_t num_layers, H, Hq, Hkv, D, I, block_size;
    float eps, scale;
    /* scratch for max_rows tokens: [M, H], [M, (Hq + 2 Hkv) D], [M, Hq D], [M, H], [M, 2 I], [M, I] */
    float *h, *qkv_out, *attn_out, *o_out, *gate_up_out, *act;
    int8_t *codes;  /* 2 * max_rows * max(H, Hq D, I) bytes: the linear layers' activation digits */
    float *x_scales;  /* [max_rows] */
    int64_t max_rows;
};

struct decode_step {
    void *kv_caches;  /* [num_layers, ...] contiguous: layer i at element i * layer_stride */
    int64_t layer_stride;
    const float *cos, *sin;  /* [M, D / 2] each, the tokens' positions */
    const int64_t *slots, *tables, *seq, *lens;  /* per token: its K/V slot, the row of its sequence's
                                                    block table in tables, the positions it sees */
    int64_t table_width;
    float *scores;  /* num_threads * Hq * max_len floats */
    int num_threads;
    int kv_half;  /* 1: the cache holds fp16, 0: fp32 */
    int64_t num_rows, max_len;  /* M <= max_rows tokens; the most positions one sees */
};

static void plan_linear(const float *x, float *out, int64_t M, const struct int8_row_args *a,
                        const struct decode_model *m) {
    if (M == 1) int8_row_linear_packed(x, out, a);
    else int8_rows_linear(x, out, M, a, m->codes, m->x_scales);
}

/* x: the residual stream [M, H] (updated in place); delta: [M, H], in: the last layer's MLP output still
   to be added (ignored when add_first is 0), out: the last layer's MLP output. The linear layers' row
   arguments carry their thread count (the caller sets them to s->num_threads). */
void decode_layers(const struct decode_model *m, const struct decode_step *s, float *x, float *delta,
                   int add_first) {
    const int64_t M = s->num_rows, width = (m->Hq + 2 * m->Hkv) * m->D;
    for (int64_t i = 0; i < m->num_layers; i++) {
        const struct decode_layer *l = m->layers + i;
        void *kv = (char *)s->kv_caches + i * s->layer_stride * (s->kv_half ? 2 : 4);
        rms_norm(x, (i > 0 || add_first) ? delta : NULL, M, m->H, l->input_norm, m->eps, m->h, s->num_threads);
        plan_linear(m->h, m->qkv_out, M, l->qkv, m);
        rotary_write_kv(m->qkv_out, M, m->Hq, m->Hkv, m->D, s->cos, s->sin, kv, s->kv_half, m->block_size,
                        s->slots, s->num_threads);
        paged_attention(m->qkv_out, width, M, m->Hq, m->Hkv, m->D, kv, s->kv_half, m->block_size, s->tables,
                        s->table_width, s->seq, s->lens, m->scale, m->attn_out, s->scores, s->max_len,
                        s->num_threads);
        plan_linear(m->attn_out, m->o_out, M, l->o, m);
        rms_norm(x, m->o_out, M, m->H, l->post_norm, m->eps, m->h, s->num_threads);
        plan_linear(m->h, m->gate_up_out, M, l->gate_up, m);
        silu_mul(m->gate_up_out, M, m->I, m->act, s->num_threads);
        plan_linear(m->act, delta, M, l->down, m);
    }
}
