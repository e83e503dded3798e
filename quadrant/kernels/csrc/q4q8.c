// Integer-dot CPU GEMMs for small batches (decode): 4-bit or 8-bit weights x 16-bit activations.
//
// Activations are rounded per 32 inputs to int16 (scale = amax / 32767: 2^-15 of the block's
// largest, finer than bf16), so each block's dot product is integer multiply-adds (madd_epi16)
// instead of unpacking every weight to a float, as torch's CPU int4 kernel does. 8-bit
// activations (llama.cpp's Q8_1, one instruction fewer per block) flip SmolLM2's first answer
// token on some prompts; 16-bit ones do not. Built with -mavx2 -mfma -mf16c (and -mavx512bw where
// torch finds AVX-512) by quadrant/kernels/cpu_native.py, which calls these through ctypes on
// float32 tensors.
//
// q4 weights: per row, 16 bytes of codes per block of 32 inputs (code j in the low nibble of byte j,
// code j + 16 in the high one), and apart from them the row's G fp16 scales d then its G fp16 mins m;
// the weight is code * d + m. Scales apart from codes let the AVX-512 kernel load 16 blocks' scales as
// one vector, and two blocks' codes as one 32-byte load.
// q8 rows: int8 codes per input with one fp32 scale per row (symmetric).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32
#define ROWS 4  // activation rows sharing each unpacked weight block

// Where an activation block's 32 codes go in its row of xq. With `pairs` (the AVX-512 4-bit kernel),
// blocks 2p and 2p + 1 interleave by halves: A's codes 0-15, B's 0-15, A's 16-31, B's 16-31, so one
// 32-byte load of both blocks' weight codes, split into low and high nibbles, meets them in order.
// A last block without a partner keeps the plain order.
static inline int64_t act_index(int64_t g, int j, int64_t G, int pairs) {
    if (!pairs || (g % 2 == 0 && g + 1 == G)) return g * QK + j;
    const int64_t base = (g - g % 2) * QK;
    return g % 2 == 0 ? base + (j < 16 ? j : 16 + j) : base + (j < 16 ? 16 + j : 32 + j);
}

// x [M, K] -> xq [M, K] int16 (in act_index order), xd [M, G] block scales, xs [M, G] scale * sum of
// the block's codes.
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *xq, float *xd, float *xs, int pairs) {
    const int64_t G = K / QK;
    for (int64_t r = 0; r < M; r++) {
        for (int64_t g = 0; g < G; g++) {
            const float *src = x + r * K + g * QK;
            int16_t *dst = xq + r * K;
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) {
                float a = fabsf(src[j]);
                amax = a > amax ? a : amax;
            }
            const float d = amax / 32767.0f;
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            for (int j = 0; j < QK; j++) {
                int q = (int)lrintf(src[j] * id);
                dst[act_index(g, j, G, pairs)] = (int16_t)q;
                sum += q;
            }
            xd[r * G + g] = d;
            xs[r * G + g] = d * (float)sum;
        }
    }
}

// One block of 32 weight codes as int16 (`wblock`), its dot product with 32 int16 activations as
// partial sums (`vsum`): one 512-bit multiply-add where AVX-512 is built in (cpu_native.py builds it
// where torch finds the CPU and OS support it), two 256-bit ones otherwise. The products are exact:
// every partial sum stays far inside int32.
#if defined(__AVX512BW__)
typedef __m512i wblock;
typedef __m512 vsum;
#define VZERO() _mm512_setzero_ps()
#define VFMADD(scale, dot, acc) _mm512_fmadd_ps(_mm512_set1_ps(scale), dot, acc)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VREDUCE(v) _mm512_reduce_add_ps(v)

static inline wblock unpack_q4(const uint8_t *qs) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(0x0F);
    return _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                                                 _mm_and_si128(bytes, mask)));  // codes 0..31 in order
}

static inline wblock unpack_q8(const int8_t *w) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)w));
}

static inline vsum dot_block(wblock w, const int16_t *act) {
    return _mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512((const void *)act)));
}
#else
typedef struct {
    __m256i lo, hi;  // codes 0..15, 16..31
} wblock;
typedef __m256 vsum;
#define VZERO() _mm256_setzero_ps()
#define VFMADD(scale, dot, acc) _mm256_fmadd_ps(_mm256_set1_ps(scale), dot, acc)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VREDUCE(v) hsum(v)

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline wblock unpack_q4(const uint8_t *qs) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(0x0F);
    wblock w = {_mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask)),
                _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask))};
    return w;
}

static inline wblock unpack_q8(const int8_t *w) {
    wblock b = {_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)))};
    return b;
}

static inline vsum dot_block(wblock w, const int16_t *act) {
    const __m256i a0 = _mm256_loadu_si256((const __m256i *)act);
    const __m256i a1 = _mm256_loadu_si256((const __m256i *)(act + 16));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w.lo, a0), _mm256_madd_epi16(w.hi, a1)));
}
#endif

#if defined(__AVX512BW__)
#define Q4_PAIRS 1

// Two blocks' codes (32 bytes) as int16, low nibbles (codes 0-15 of each) and high ones (16-31).
static inline void unpack_pair(const uint8_t *qs, __m512i *lo, __m512i *hi) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)qs));
    *lo = _mm512_and_si512(v, _mm512_set1_epi16(0x0F));
    *hi = _mm512_srli_epi16(v, 4);
}

// Lanes 0-7 from lane j of v, lanes 8-15 from lane j + 1: a pair's two block scales.
static inline __m512 pair_scales(__m512 v, int j) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(j),
                                         _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0));
    return _mm512_permutexvar_ps(idx, v);
}

// A pair's partial sums: block A's in int32 lanes 0-7, B's in 8-15 (activations in act_index order).
static inline __m512 dot_pair(__m512i lo, __m512i hi, const int16_t *act) {
    const __m512i a = _mm512_madd_epi16(lo, _mm512_loadu_si512((const void *)act));
    const __m512i b = _mm512_madd_epi16(hi, _mm512_loadu_si512((const void *)(act + 32)));
    return _mm512_cvtepi32_ps(_mm512_add_epi32(a, b));
}

// One 4-bit weight row against `rows` (<= ROWS) activation rows. Blocks go 16 at a time: their scales
// and mins are one vector each (the mins' term Σ m·s is one multiply-add per row), and each pair of
// blocks is one load, one unpack and one multiply-add per row. A last odd block goes alone.
static inline void q4_dot_rows(const uint8_t *codes, const uint16_t *dh, const uint16_t *mh, const int16_t *q,
                               const float *d, const float *s, int64_t G, int64_t K, int rows, float *res) {
    __m512 acc[ROWS], accm[ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = accm[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < G; c += 16) {
        const int n = G - c < 16 ? (int)(G - c) : 16;
        const __mmask16 mask = (__mmask16)((1u << n) - 1);
        const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dh + c));
        const __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mh + c));
        __m512 sc[ROWS];
        for (int i = 0; i < rows; i++) {
            sc[i] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(mask, d + i * G + c));
            accm[i] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(mask, s + i * G + c), accm[i]);
        }
        int j = 0;
        for (; j + 1 < n; j += 2) {
            const int64_t g = c + j;
            __m512i lo, hi;
            unpack_pair(codes + g * (QK / 2), &lo, &hi);
            for (int i = 0; i < rows; i++)
                acc[i] = _mm512_fmadd_ps(pair_scales(sc[i], j), dot_pair(lo, hi, q + i * K + g * QK), acc[i]);
        }
        if (j < n) {  // the row's last block, without a partner
            const int64_t g = c + j;
            const wblock w = unpack_q4(codes + g * (QK / 2));
            for (int i = 0; i < rows; i++) {
                const __m512 one = _mm512_permutexvar_ps(_mm512_set1_epi32(j), sc[i]);
                acc[i] = _mm512_fmadd_ps(one, dot_block(w, q + i * K + g * QK), acc[i]);
            }
        }
    }
    for (int i = 0; i < rows; i++) res[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i], accm[i]));
}

static inline float q4_dot_row(const uint8_t *codes, const uint16_t *dh, const uint16_t *mh, const int16_t *q,
                               const float *d, const float *s, int64_t G) {
    float res;
    q4_dot_rows(codes, dh, mh, q, d, s, G, G * QK, 1, &res);
    return res;
}
#else
#define Q4_PAIRS 0

// One 4-bit weight row against one activation row: two chains (even and odd blocks) in flight.
static inline float q4_dot_row(const uint8_t *codes, const uint16_t *dh, const uint16_t *mh, const int16_t *q,
                               const float *d, const float *s, int64_t G) {
    vsum acc0 = VZERO(), acc1 = VZERO();
    float mins = 0.0f;
    int64_t g = 0;
    for (; g + 1 < G; g += 2) {
        const wblock c0 = unpack_q4(codes + g * (QK / 2)), c1 = unpack_q4(codes + (g + 1) * (QK / 2));
        acc0 = VFMADD(_cvtsh_ss(dh[g]) * d[g], dot_block(c0, q + g * QK), acc0);
        acc1 = VFMADD(_cvtsh_ss(dh[g + 1]) * d[g + 1], dot_block(c1, q + (g + 1) * QK), acc1);
        mins += _cvtsh_ss(mh[g]) * s[g] + _cvtsh_ss(mh[g + 1]) * s[g + 1];
    }
    for (; g < G; g++) {
        acc0 = VFMADD(_cvtsh_ss(dh[g]) * d[g], dot_block(unpack_q4(codes + g * (QK / 2)), q + g * QK), acc0);
        mins += _cvtsh_ss(mh[g]) * s[g];
    }
    return VREDUCE(VADD(acc0, acc1)) + mins;
}

// One 4-bit weight row against `rows` (<= ROWS) activation rows; each block is unpacked once.
static inline void q4_dot_rows(const uint8_t *codes, const uint16_t *dh, const uint16_t *mh, const int16_t *q,
                               const float *d, const float *s, int64_t G, int64_t K, int rows, float *res) {
    vsum acc[ROWS];
    float mins[ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = VZERO(), mins[i] = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        const wblock c = unpack_q4(codes + g * (QK / 2));
        const float dw = _cvtsh_ss(dh[g]), mw = _cvtsh_ss(mh[g]);
        for (int i = 0; i < rows; i++) {
            acc[i] = VFMADD(dw * d[i * G + g], dot_block(c, q + i * K + g * QK), acc[i]);
            mins[i] += mw * s[i * G + g];
        }
    }
    for (int i = 0; i < rows; i++) res[i] = VREDUCE(acc[i]) + mins[i];
}
#endif

// One int8 weight row against `rows` (<= ROWS) activation rows.
static inline void q8_dot_rows(const int8_t *row, const int16_t *q, const float *d, int64_t G, int64_t K, int rows,
                               float *res) {
    vsum acc[ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = VZERO();
    for (int64_t g = 0; g < G; g++) {
        const wblock c = unpack_q8(row + g * QK);
        for (int i = 0; i < rows; i++) acc[i] = VFMADD(d[i * G + g], dot_block(c, q + i * K + g * QK), acc[i]);
    }
    for (int i = 0; i < rows; i++) res[i] = VREDUCE(acc[i]);
}

typedef struct {
    int16_t *q;
    float *d, *s;
} scratch;

static int scratch_alloc(scratch *t, int64_t M, int64_t K) {
    const int64_t G = K / QK;
    t->q = malloc(sizeof(int16_t) * (size_t)(M * K));
    t->d = malloc(sizeof(float) * (size_t)(M * G));
    t->s = malloc(sizeof(float) * (size_t)(M * G));
    return t->q != NULL && t->d != NULL && t->s != NULL;
}

static void scratch_free(scratch *t) {
    free(t->q), free(t->d), free(t->s);
}

// out [M, N] = x [M, K] . W^T (+ bias [N]); W as codes [N, K / 2] and scales [N, 2, K / 32] (fp16 d
// then m per row). Returns 0 on success.
int q4_gemm(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales, int64_t N,
            const float *bias, float *out) {
    const int64_t G = K / QK;
    scratch t;
    if (!scratch_alloc(&t, M, K)) {
        scratch_free(&t);
        return 1;
    }
    quantize_rows(x, M, K, t.q, t.d, t.s, Q4_PAIRS);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float b = bias ? bias[n] : 0.0f;
        const uint8_t *row = codes + n * (K / 2);
        const uint16_t *dh = scales + n * 2 * G, *mh = dh + G;
        if (M == 1) {
            out[n] = q4_dot_row(row, dh, mh, t.q, t.d, t.s, G) + b;
            continue;
        }
        for (int64_t r = 0; r < M; r += ROWS) {
            const int rows = M - r < ROWS ? (int)(M - r) : ROWS;
            float res[ROWS];
            q4_dot_rows(row, dh, mh, t.q + r * K, t.d + r * G, t.s + r * G, G, K, rows, res);
            for (int i = 0; i < rows; i++) out[(r + i) * N + n] = res[i] + b;
        }
    }
    scratch_free(&t);
    return 0;
}

// out [M, N] = x [M, K] . (W * scale[:, None])^T (+ bias); W int8 [N, K]. Returns 0 on success.
int q8_gemm(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale, int64_t N,
            const float *bias, float *out) {
    const int64_t G = K / QK;
    scratch t;
    if (!scratch_alloc(&t, M, K)) {
        scratch_free(&t);
        return 1;
    }
    quantize_rows(x, M, K, t.q, t.d, t.s, 0);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t r = 0; r < M; r += ROWS) {
            const int rows = M - r < ROWS ? (int)(M - r) : ROWS;
            float res[ROWS];
            q8_dot_rows(w + n * K, t.q + r * K, t.d + r * G, G, K, rows, res);
            for (int i = 0; i < rows; i++) out[(r + i) * N + n] = res[i] * scale[n] + b;
        }
    }
    scratch_free(&t);
    return 0;
}
