/* Single-stream decode: all decoder layers of a Llama-family model with int8 linear layers for one
token, in one call. It calls the same functions, in the same order and with the same arguments,
as the Python path calls one by one (int8_linear.c and layer_ops.c, compiled into the same
library), so a token gets exactly the bits it would get there, or inside any batch; what it saves
is ~100 us of Python and ctypes per layer.
*/

struct decode_layer {
    const float *input_norm, *post_norm;  /* RMSNorm weights [H] */
    const struct int8_row_args *qkv, *o, *gate_up, *down;
};

struct decode_model {
    const struct decode_layer *layers;
    int64_t num_layers, H, Hq, Hkv, D, I, block_size;
    float eps, scale;
    float *h, *qkv_out, *attn_out, *o_out, *gate_up_out, *act;  /* scratch: [H], [(Hq + 2 Hkv) D], [Hq D], [H],
                                                                   [2 I], [I] */
};

struct decode_step {
    float *kv_caches;  /* [num_layers, ...] contiguous: layer i at kv_caches + i * layer_stride */
    int64_t layer_stride;
    const float *cos, *sin;  /* [D / 2] each, this token's position */
    const int64_t *slot, *table, *len;  /* where its K/V go; its block table [table_width]; positions it sees */
    int64_t table_width;
    float *scores;  /* num_threads * Hq / Hkv * len floats */
    int num_threads;
};

/* x: the residual stream [H] (updated in place); delta: [H], in: the last layer's MLP output still to
   be added (ignored when add_first is 0), out: the last layer's MLP output. The linear layers' row
   arguments carry their thread count (the caller sets them to s->num_threads). */
void decode_layers(const struct decode_model *m, const struct decode_step *s, float *x, float *delta,
                   int add_first) {
    const int64_t seq = 0, width = (m->Hq + 2 * m->Hkv) * m->D;
    for (int64_t i = 0; i < m->num_layers; i++) {
        const struct decode_layer *l = m->layers + i;
        float *kv = s->kv_caches + i * s->layer_stride;
        rms_norm(x, (i > 0 || add_first) ? delta : NULL, 1, m->H, l->input_norm, m->eps, m->h, s->num_threads);
        int8_row_linear_packed(m->h, m->qkv_out, l->qkv);
        rotary_write_kv(m->qkv_out, 1, m->Hq, m->Hkv, m->D, s->cos, s->sin, kv, s->slot, s->num_threads);
        paged_attention(m->qkv_out, width, 1, m->Hq, m->Hkv, m->D, kv, m->block_size, s->table, s->table_width,
                        &seq, s->len, m->scale, m->attn_out, s->scores, s->len[0], s->num_threads);
        int8_row_linear_packed(m->attn_out, m->o_out, l->o);
        rms_norm(x, m->o_out, 1, m->H, l->post_norm, m->eps, m->h, s->num_threads);
        int8_row_linear_packed(m->h, m->gate_up_out, l->gate_up);
        silu_mul(m->gate_up_out, 1, m->I, m->act, s->num_threads);
        int8_row_linear_packed(m->act, delta, l->down);
    }
}
