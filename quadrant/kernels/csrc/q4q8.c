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
// q4 blocks: {fp16 scale d, fp16 min m, 16 bytes of codes} per 32 inputs of a row; code j sits in
// the low nibble of byte j and code j + 16 in the high one; the weight is code * d + m.
// q8 rows: int8 codes per input with one fp32 scale per row (symmetric).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32
#define ROWS 4  // activation rows sharing each unpacked weight block

typedef struct {
    uint16_t d;
    uint16_t m;
    uint8_t qs[QK / 2];
} block_q4;

// x [M, K] -> xq [M, K] int16, xd [M, G] block scales, xs [M, G] scale * sum of the block's codes.
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *xq, float *xd, float *xs) {
    const int64_t G = K / QK;
    for (int64_t r = 0; r < M; r++) {
        for (int64_t g = 0; g < G; g++) {
            const float *src = x + r * K + g * QK;
            int16_t *dst = xq + r * K + g * QK;
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
                dst[j] = (int16_t)q;
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

// One 4-bit weight row against one activation row: two chains (even and odd blocks) in flight.
static inline float q4_dot_row(const block_q4 *row, const int16_t *q, const float *d, const float *s, int64_t G) {
    vsum acc0 = VZERO(), acc1 = VZERO();
    float mins = 0.0f;
    int64_t g = 0;
    for (; g + 1 < G; g += 2) {
        const wblock c0 = unpack_q4(row[g].qs), c1 = unpack_q4(row[g + 1].qs);
        acc0 = VFMADD(_cvtsh_ss(row[g].d) * d[g], dot_block(c0, q + g * QK), acc0);
        acc1 = VFMADD(_cvtsh_ss(row[g + 1].d) * d[g + 1], dot_block(c1, q + (g + 1) * QK), acc1);
        mins += _cvtsh_ss(row[g].m) * s[g] + _cvtsh_ss(row[g + 1].m) * s[g + 1];
    }
    for (; g < G; g++) {
        acc0 = VFMADD(_cvtsh_ss(row[g].d) * d[g], dot_block(unpack_q4(row[g].qs), q + g * QK), acc0);
        mins += _cvtsh_ss(row[g].m) * s[g];
    }
    return VREDUCE(VADD(acc0, acc1)) + mins;
}

// One 4-bit weight row against `rows` (<= ROWS) activation rows; each block is unpacked once.
static inline void q4_dot_rows(const block_q4 *row, const int16_t *q, const float *d, const float *s, int64_t G,
                               int64_t K, int rows, float *res) {
    vsum acc[ROWS];
    float mins[ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = VZERO(), mins[i] = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        const wblock c = unpack_q4(row[g].qs);
        const float dw = _cvtsh_ss(row[g].d), mw = _cvtsh_ss(row[g].m);
        for (int i = 0; i < rows; i++) {
            acc[i] = VFMADD(dw * d[i * G + g], dot_block(c, q + i * K + g * QK), acc[i]);
            mins[i] += mw * s[i * G + g];
        }
    }
    for (int i = 0; i < rows; i++) res[i] = VREDUCE(acc[i]) + mins[i];
}

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

// out [M, N] = x [M, K] . W^T (+ bias [N]); W as N rows of K / 32 q4 blocks. Returns 0 on success.
int q4_gemm(const float *x, int64_t M, int64_t K, const block_q4 *w, int64_t N, const float *bias, float *out) {
    const int64_t G = K / QK;
    scratch t;
    if (!scratch_alloc(&t, M, K)) {
        scratch_free(&t);
        return 1;
    }
    quantize_rows(x, M, K, t.q, t.d, t.s);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float b = bias ? bias[n] : 0.0f;
        if (M == 1) {
            out[n] = q4_dot_row(w + n * G, t.q, t.d, t.s, G) + b;
            continue;
        }
        for (int64_t r = 0; r < M; r += ROWS) {
            const int rows = M - r < ROWS ? (int)(M - r) : ROWS;
            float res[ROWS];
            q4_dot_rows(w + n * G, t.q + r * K, t.d + r * G, t.s + r * G, G, K, rows, res);
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
    quantize_rows(x, M, K, t.q, t.d, t.s);
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
