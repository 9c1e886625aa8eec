/* One decode step of a Llama-family decoder for a single sequence, in C (llama2.c's cut, with OpenMP threads).

   At batch 1 a decode step is one pass over the weights. This file does that pass with one parallel region per
   step: every matrix-vector product splits its rows between the threads, each row a dot product over several vector
   accumulators (float32, bfloat16 or int8 weights, float32 activations); norms, RoPE and attention run between them.
   lmforge/generate/native_step.py builds it with the system compiler for the machine it runs on (-march=native), lays
   out a model's tensors in the structs below and checks what it supports; model.py stays the reference. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, I8 = 2 };       /* weight and cache element types */
enum { SILU = 0, GELU_TANH = 1 };          /* the gate's activation */

typedef struct {
    const void *weight;                    /* (rows, cols), row-major */
    const float *scale;                    /* I8: one per row, else NULL */
    const float *bias;                     /* or NULL */
    int32_t rows, cols, kind;
} Linear;

typedef struct {
    const float *attn_norm, *mlp_norm;     /* RMSNorm gains (Gemma's offset already added) */
    const float *q_norm, *k_norm;          /* per-head RMSNorm gains of q and k (Qwen3), or NULL */
    Linear q, k, v, o, gate, up, down;
    void *k_cache, *v_cache;               /* (kv_heads, max_len, head_dim) of the cache's kind */
    int32_t window;                        /* sliding window, 0 for none */
} Layer;

typedef struct {
    int32_t dim, layers, heads, kv_heads, head_dim, rotary_dim, hidden, vocab, max_len;
    int32_t embed_kind, cache_kind, act, threads;
    float norm_eps, attn_scale, embed_scale;
    const void *embed;                     /* (vocab, dim) */
    const float *cos, *sin;                /* (max_len, rotary_dim) RoPE tables */
    const float *final_norm;
    Linear head;
    const Layer *layer;
    float *x, *normed, *qkv, *att, *gated, *scores;  /* scratch: dim, threads*dim, q+k+v, heads*head_dim,
                                                        hidden, heads*max_len */
} Model;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* ---- dot products: four vector accumulators, so that each add does not wait on the one before ---------------- */

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec load_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline vec load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vec load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec load_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline vec load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#endif

#ifdef LANES
#define DOT(name, type, load, scalar)                                                        \
    static float name(const type *w, const float *x, int n) {                               \
        vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();                          \
        int i = 0;                                                                           \
        for (; i + 4 * LANES <= n; i += 4 * LANES) {                                         \
            a0 = vfma(load(w + i), load_f32(x + i), a0);                                     \
            a1 = vfma(load(w + i + LANES), load_f32(x + i + LANES), a1);                     \
            a2 = vfma(load(w + i + 2 * LANES), load_f32(x + i + 2 * LANES), a2);             \
            a3 = vfma(load(w + i + 3 * LANES), load_f32(x + i + 3 * LANES), a3);             \
        }                                                                                    \
        for (; i + LANES <= n; i += LANES) a0 = vfma(load(w + i), load_f32(x + i), a0);      \
        float s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));                                    \
        for (; i < n; i++) s += scalar(w[i]) * x[i];                                         \
        return s;                                                                            \
    }
#else
#define DOT(name, type, load, scalar)                                                        \
    static float name(const type *w, const float *x, int n) {                               \
        float a[8] = {0};                                                                    \
        int i = 0;                                                                           \
        for (; i + 8 <= n; i += 8)                                                           \
            for (int j = 0; j < 8; j++) a[j] += scalar(w[i + j]) * x[i + j];                 \
        float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));         \
        for (; i < n; i++) s += scalar(w[i]) * x[i];                                         \
        return s;                                                                            \
    }
#endif

#define AS_FLOAT(v) ((float)(v))
DOT(dot_f32, float, load_f32, AS_FLOAT)
DOT(dot_bf16, uint16_t, load_bf16, bf16_to_f32)
DOT(dot_i8, int8_t, load_i8, AS_FLOAT)

static float dot(const void *w, int kind, size_t row, int n, const float *x) {
    switch (kind) {
    case BF16: return dot_bf16((const uint16_t *)w + row * n, x, n);
    case I8: return dot_i8((const int8_t *)w + row * n, x, n);
    default: return dot_f32((const float *)w + row * n, x, n);
    }
}

static inline float row_of(const Linear *l, int r, const float *x) {
    float y = dot(l->weight, l->kind, (size_t)r, l->cols, x);
    if (l->scale) y *= l->scale[r];
    if (l->bias) y += l->bias[r];
    return y;
}

/* ---- the other pieces of a layer ------------------------------------------------------------------------------ */

static void rms_norm(const float *x, const float *gain, float *out, int n, float eps) {
    float squares = 0.f;
    for (int i = 0; i < n; i++) squares += x[i] * x[i];
    float inv = 1.f / sqrtf(squares / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * gain[i];
}

static void rope(float *x, const float *cos, const float *sin, int rotary_dim) {
    int half = rotary_dim / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline float load_kind(const void *p, int kind, size_t i) {
    return kind == BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static void store(void *p, int kind, size_t at, const float *x, int n) {
    if (kind == BF16)
        for (int i = 0; i < n; i++) ((uint16_t *)p)[at + i] = f32_to_bf16(x[i]);
    else
        memcpy((float *)p + at, x, n * sizeof(float));
}

static float activation(float g, int act) {
    if (act == GELU_TANH) return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return g / (1.f + expf(-g));
}

/* One query head over the cached positions [first, pos]: softmax(q K^T * scale) V into `out`. */
static void attend(const Model *m, const Layer *l, const float *q, int kv_head, int first, int pos, float *scores,
                   float *out) {
    int d = m->head_dim, kind = m->cache_kind;
    size_t base = (size_t)kv_head * m->max_len * d;
    float top = -INFINITY;
    for (int t = first; t <= pos; t++) {
        size_t at = base + (size_t)t * d;
        float s = kind == BF16 ? dot_bf16((const uint16_t *)l->k_cache + at, q, d)
                               : dot_f32((const float *)l->k_cache + at, q, d);
        scores[t] = s * m->attn_scale;
        if (scores[t] > top) top = scores[t];
    }
    float total = 0.f;
    for (int t = first; t <= pos; t++) total += scores[t] = expf(scores[t] - top);
    for (int i = 0; i < d; i++) out[i] = 0.f;
    for (int t = first; t <= pos; t++) {
        float p = scores[t] / total;
        size_t at = base + (size_t)t * d;
        for (int i = 0; i < d; i++) out[i] += p * load_kind(l->v_cache, kind, at + i);
    }
}

/* ---- the step ------------------------------------------------------------------------------------------------- */

/* Feed `token` at position `pos` (its keys and values are written to the cache there); the next token's logits
   (vocab floats) into `logits`. */
void lmforge_decode_step(const Model *m, int32_t token, int32_t pos, float *logits) {
    int dim = m->dim, d = m->head_dim, q_rows = m->heads * d, kv_rows = m->kv_heads * d;
    int group = m->heads / m->kv_heads;
    const float *cos = m->cos + (size_t)pos * m->rotary_dim, *sin = m->sin + (size_t)pos * m->rotary_dim;
    for (int i = 0; i < dim; i++) m->x[i] = load_kind(m->embed, m->embed_kind, (size_t)token * dim + i) * m->embed_scale;

#pragma omp parallel num_threads(m->threads)
    {
        float *normed = m->normed + (size_t)omp_get_thread_num() * dim;  /* each thread normalises for itself */
        for (int n = 0; n < m->layers; n++) {
            const Layer *l = &m->layer[n];
            rms_norm(m->x, l->attn_norm, normed, dim, m->norm_eps);
#pragma omp for schedule(static)
            for (int r = 0; r < q_rows + 2 * kv_rows; r++)
                m->qkv[r] = r < q_rows ? row_of(&l->q, r, normed)
                          : r < q_rows + kv_rows ? row_of(&l->k, r - q_rows, normed)
                          : row_of(&l->v, r - q_rows - kv_rows, normed);
#pragma omp for schedule(static)
            for (int h = 0; h < m->kv_heads; h++) {
                float *k = m->qkv + q_rows + h * d, *v = k + kv_rows;
                if (l->k_norm) rms_norm(k, l->k_norm, k, d, m->norm_eps);
                rope(k, cos, sin, m->rotary_dim);
                size_t at = ((size_t)h * m->max_len + pos) * d;
                store(l->k_cache, m->cache_kind, at, k, d);
                store(l->v_cache, m->cache_kind, at, v, d);
            }
            int first = l->window && pos >= l->window ? pos - l->window + 1 : 0;
#pragma omp for schedule(static)
            for (int h = 0; h < m->heads; h++) {
                float *q = m->qkv + h * d;
                if (l->q_norm) rms_norm(q, l->q_norm, q, d, m->norm_eps);
                rope(q, cos, sin, m->rotary_dim);
                attend(m, l, q, h / group, first, pos, m->scores + (size_t)h * m->max_len, m->att + h * d);
            }
#pragma omp for schedule(static)
            for (int r = 0; r < dim; r++) m->x[r] += row_of(&l->o, r, m->att);
            rms_norm(m->x, l->mlp_norm, normed, dim, m->norm_eps);
#pragma omp for schedule(static)
            for (int r = 0; r < m->hidden; r++)
                m->gated[r] = activation(row_of(&l->gate, r, normed), m->act) * row_of(&l->up, r, normed);
#pragma omp for schedule(static)
            for (int r = 0; r < dim; r++) m->x[r] += row_of(&l->down, r, m->gated);
        }
        rms_norm(m->x, m->final_norm, normed, dim, m->norm_eps);
#pragma omp for schedule(static)
        for (int r = 0; r < m->vocab; r++) logits[r] = row_of(&m->head, r, normed);
    }
}
