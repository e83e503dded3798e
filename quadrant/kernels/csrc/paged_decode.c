// Decode attention straight from the paged fp32 KV cache on the CPU: one query token per sequence.
//
// The torch path gathers every sequence's blocks into a padded [B, Hk, S, D] copy, then runs two
// batched matmuls and a masked softmax: at 48 sequences of a few hundred tokens that gather and
// copy are most of a decode step. Here each (sequence, KV head) pair reads its keys and values
// once, in place, for all the query heads that share them (GQA), with an exact two-pass softmax
// (scores, max, exp and sum, then the weighted values). Built with the GEMMs by
// quadrant/kernels/cpu_native.py (-mavx2 -mfma); head_dim must be a multiple of 8.
//
// Cache layout: K and V each [num_blocks, Hk, block_size, D] (engine/kv_cache.py, head-major).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// e^x for 8 floats (Cephes' single-precision range reduction and polynomial, ~1 ulp).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
    const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

static inline float dot(const float *a, const float *b, int64_t D) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
    }
    for (; d < D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    return hsum8(_mm256_add_ps(acc0, acc1));
}

// Whether position s is attended by a query whose speculative token tree span starts at `span` with
// ancestor bits `bits` (bit j: the span's j-th position); positions before the span always are.
static inline int in_tree(int64_t s, int64_t span, int64_t bits) {
    return s < span || (s - span < 64 && (((uint64_t)bits >> (s - span)) & 1u));
}

// One sequence's one KV head: the G query heads q [G, D] over its S cached positions -> out [G, D].
// scores: scratch of G * S floats; acc: G * D floats. Positions from `span` on count only where their
// bit is set in `bits` (span >= S: none masked).
static void attend_head(const float *q, const float *kc, const float *vc, const int32_t *table, int64_t S,
                        int64_t span, int64_t bits, int64_t Hk, int64_t h, int64_t BS, int64_t D, int64_t G,
                        float scale, float *scores, float *acc, float *out) {
    for (int64_t s = 0; s < S; s++) {
        const int64_t row = (((int64_t)table[s / BS] * Hk + h) * BS + s % BS) * D;
        const int keep = in_tree(s, span, bits);
        for (int64_t g = 0; g < G; g++) scores[g * S + s] = keep ? dot(q + g * D, kc + row, D) * scale : -INFINITY;
    }
    for (int64_t g = 0; g < G; g++) {
        float *p = scores + g * S;
        float m = p[0];
        for (int64_t s = 1; s < S; s++) m = p[s] > m ? p[s] : m;
        const __m256 mv = _mm256_set1_ps(m);
        __m256 sum8 = _mm256_setzero_ps();
        int64_t s = 0;
        for (; s + 8 <= S; s += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), mv));
            _mm256_storeu_ps(p + s, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum8(sum8);
        if (s < S) {  // the tail through a padded vector
            float tail[8] = {0};
            for (int64_t i = s; i < S; i++) tail[i - s] = p[i] - m;
            float e[8];
            _mm256_storeu_ps(e, exp8(_mm256_loadu_ps(tail)));
            for (int64_t i = s; i < S; i++) p[i] = e[i - s], sum += e[i - s];
        }
        const float inv = 1.0f / sum;
        for (s = 0; s < S; s++) p[s] = in_tree(s, span, bits) ? p[s] * inv : 0.0f;  // exp8 floors at e^-87
    }
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        if (!in_tree(s, span, bits)) continue;
        const float *v = vc + (((int64_t)table[s / BS] * Hk + h) * BS + s % BS) * D;
        for (int64_t g = 0; g < G; g++) {
            const __m256 w = _mm256_set1_ps(scores[g * S + s]);
            float *a = acc + g * D;
            for (int64_t d = 0; d < D; d += 8)
                _mm256_storeu_ps(a + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(v + d), _mm256_loadu_ps(a + d)));
        }
    }
    for (int64_t i = 0; i < G * D; i++) out[i] = acc[i];
}

// q [B, Hq, D], tables [B, W] int32, seq_lens [B] int32 (each >= 1) -> out [B, Hq, D]. tree_start [B]
// int32 and tree_bits [B] int64, or both NULL: rows verifying a speculative token tree, each attending
// to the positions before its tree's span and to its ancestors in it (AttentionMetadata.tree_mask).
// Returns 0 on success, 1 when scratch memory ran out, 2 for a shape it does not take.
int paged_decode_f32(const float *q, const float *kc, const float *vc, const int32_t *tables, int64_t W,
                     const int32_t *seq_lens, const int32_t *tree_start, const int64_t *tree_bits, int64_t B,
                     int64_t Hq, int64_t Hk, int64_t BS, int64_t D, float scale, float *out) {
    if (D % 8 != 0 || Hk <= 0 || Hq % Hk != 0) return 2;
    const int64_t G = Hq / Hk;
    int64_t max_len = 1;
    for (int64_t b = 0; b < B; b++) {
        if (seq_lens[b] < 1 || seq_lens[b] > W * BS) return 2;
        max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (G * max_len + G * D));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t h = 0; h < Hk; h++) {
                if (!scores) continue;
                const int64_t span = tree_start ? tree_start[b] : seq_lens[b];
                attend_head(q + (b * Hq + h * G) * D, kc, vc, tables + b * W, seq_lens[b], span,
                            tree_bits ? tree_bits[b] : -1, Hk, h, BS, D, G, scale, scores, scores + G * max_len,
                            out + (b * Hq + h * G) * D);
            }
        }
        free(scores);
    }
    return failed;
}
