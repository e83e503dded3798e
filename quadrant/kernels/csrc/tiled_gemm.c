// Integer-dot CPU GEMMs for small batches (decode, verification, batched decode), on weights stored in
// tiles of TILE output rows, one vector lane per output row: 4-bit weights (GGUF Q4_1's grid: fp16 scale
// and min per 32 inputs) and int8 ones (one fp32 scale per row, the LM head's and 8-bit checkpoints').
//
// Why tiles: with a row's 32 weights of a block in one vector (the layout before), each block's int32 sums
// had to be converted, scaled and summed across lanes per activation row, about five vector operations per
// 64 products besides the multiply. In a tile, lane r holds output row r, so one vpdpbusd takes 4 inputs of
// TILE rows against the same 4 activation codes (a broadcast), and all eight of a block's dpbusd land in the
// same int32 accumulator: the conversion and scaling happen once per block and TILE rows. Port 0 (512-bit
// multiplies) then does little but the dot products, and an 8-row step costs a fraction more than a one-row
// one (BENCHMARKS.md), as in llama.cpp's repacked (interleaved) kernels.
//
// Activations are rounded per block of 32 inputs to 14-bit integers q = 128 h + l (scale amax / 8127), h and
// l in [-64, 63], so each block's dot product is 128 dot(w, h) + dot(w, l): 64 times finer than bf16. 8-bit
// activations (llama.cpp's Q8_1) would take one dpbusd per 4 inputs instead of two (0.6x the time at 8
// rows) but flip SmolLM2's first answer token on some prompts, and make a row's result depend on the
// batch it runs in: here every row is rounded and summed alike at any row count, so a verification step
// or a batch of prompts gives exactly what one-row steps give. 7-bit halves keep vpmaddubsw, dpbusd's
// stand-in without VNNI, from saturating its int16 pairs (2 * 255 * 64 < 2^15).
// vpdpbusd multiplies unsigned by signed bytes: 4-bit codes are unsigned already, int8 weights are stored
// plus 128 and the block's 128 * sum(q) taken off in int32.
//
// Layouts, per tile of TILE rows and per block g of 32 inputs (rows past N in the last tile are zero):
// - 4-bit: 4 chunks of 4 * TILE bytes, chunk c's byte 4 r + k holding row r's code for input 4 c + k (low
//   nibble) and 4 (c + 4) + k (high nibble); scales apart: per tile and block, fp16 d [TILE] then m [TILE]
//   (weight = code * d + m).
// - int8: 8 chunks of 4 * TILE bytes, chunk c's byte 4 r + k holding row r's weight for input 4 c + k, plus
//   128; scales apart, fp32 [tiles * TILE].
// quadrant/kernels/cpu_native.py packs them (pack_q4, pack_q8) and builds this file with AVX2 (TILE 8) or
// AVX-512 (TILE 16), with VNNI where the CPU has it (without, a dpbusd is two multiply-adds).

#include <float.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define PASS_ROWS 8      // activation rows sharing each unpacked block of a tile
#define TOP 8127          // 63 * 128 + 63: h = floor((q + 64) / 128) stays within [-64, 63]

#if defined(__AVX512BW__)
#define TILE 16
typedef __m512i ivec;
typedef __m512 fvec;
#define I_ZERO() _mm512_setzero_si512()
#define F_ZERO() _mm512_setzero_ps()
#define LOAD_I(p) _mm512_loadu_si512((const void *)(p))
#define AND_I(a, b) _mm512_and_si512(a, b)
#define SRL16(a, n) _mm512_srli_epi16(a, n)
#define SLL32(a, n) _mm512_slli_epi32(a, n)
#define ADD32(a, b) _mm512_add_epi32(a, b)
#define SUB32(a, b) _mm512_sub_epi32(a, b)
#define SET1_I8(v) _mm512_set1_epi8(v)
#define SET1_I32(v) _mm512_set1_epi32(v)
#define SET1_F(v) _mm512_set1_ps(v)
#define CVT_F(a) _mm512_cvtepi32_ps(a)
#define MUL_F(a, b) _mm512_mul_ps(a, b)
#define FMA_F(a, b, c) _mm512_fmadd_ps(a, b, c)
#define HALVES(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define STORE_F(p, v) _mm512_storeu_ps(p, v)
#if defined(__AVX512VNNI__)
#define DPBUSD(acc, u, s) _mm512_dpbusd_epi32(acc, u, s)
#else
#define DPBUSD(acc, u, s) _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)))
#endif
#else
#define TILE 8
typedef __m256i ivec;
typedef __m256 fvec;
#define I_ZERO() _mm256_setzero_si256()
#define F_ZERO() _mm256_setzero_ps()
#define LOAD_I(p) _mm256_loadu_si256((const __m256i *)(p))
#define AND_I(a, b) _mm256_and_si256(a, b)
#define SRL16(a, n) _mm256_srli_epi16(a, n)
#define SLL32(a, n) _mm256_slli_epi32(a, n)
#define ADD32(a, b) _mm256_add_epi32(a, b)
#define SUB32(a, b) _mm256_sub_epi32(a, b)
#define SET1_I8(v) _mm256_set1_epi8(v)
#define SET1_I32(v) _mm256_set1_epi32(v)
#define SET1_F(v) _mm256_set1_ps(v)
#define CVT_F(a) _mm256_cvtepi32_ps(a)
#define MUL_F(a, b) _mm256_mul_ps(a, b)
#define FMA_F(a, b, c) _mm256_fmadd_ps(a, b, c)
#define HALVES(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define STORE_F(p, v) _mm256_storeu_ps(p, v)
#if defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#else
#define DPBUSD(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif
#endif

// The rows each tile holds, so the packer lays weights out for this build.
int tile_rows(void) {
    return TILE;
}

// Rounded activations: hi [M, K] (h), lo [M, K] (l), d [M, G] block scales, sum [M, G] each block's sum
// of codes, s [M, G] d * sum (the 4-bit weights' mins multiply it).
typedef struct {
    int8_t *hi, *lo;
    float *d, *s;
    int32_t *sum;
} acts;

static void acts_free(acts *a) {
    free(a->hi), free(a->lo), free(a->d), free(a->s), free(a->sum);
}

// Rounds x [M, K] into a (allocated here; 1 if out of memory).
static int quantize(const float *x, int64_t M, int64_t K, acts *a) {
    const int64_t G = K / QK;
    a->hi = malloc((size_t)(M * K));
    a->lo = malloc((size_t)(M * K));
    a->d = malloc(sizeof(float) * (size_t)(M * G));
    a->s = malloc(sizeof(float) * (size_t)(M * G));
    a->sum = malloc(sizeof(int32_t) * (size_t)(M * G));
    if (a->hi == NULL || a->lo == NULL || a->d == NULL || a->s == NULL || a->sum == NULL) return 1;
    for (int64_t r = 0; r < M; r++) {
        for (int64_t g = 0; g < G; g++) {
            const float *src = x + r * K + g * QK;
            __m256 amax8 = _mm256_setzero_ps();
            const __m256 sign = _mm256_set1_ps(-0.0f);
            for (int j = 0; j < QK; j += 8) amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + j)));
            float lanes[8], amax = 0.0f;
            _mm256_storeu_ps(lanes, amax8);
            for (int j = 0; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
            const float d = amax / (float)TOP;
            // a block too small for a normal scale (or NaN) rounds to zero: 1 / d would overflow
            const __m256 id = _mm256_set1_ps(d >= FLT_MIN ? 1.0f / d : 0.0f);
            int32_t q[QK];
            for (int j = 0; j < QK; j += 8)  // round half to even (the default rounding mode)
                _mm256_storeu_si256((__m256i *)(q + j), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + j), id)));
            int32_t sum = 0;
            for (int j = 0; j < QK; j++) {
                const int h = (q[j] + 64) >> 7;  // floor: l = q - 128 h lands in [-64, 63]
                a->hi[r * K + g * QK + j] = (int8_t)h;
                a->lo[r * K + g * QK + j] = (int8_t)(q[j] - 128 * h);
                sum += q[j];
            }
            a->d[r * G + g] = d;
            a->sum[r * G + g] = sum;
            a->s[r * G + g] = d * (float)sum;
        }
    }
    return 0;
}

static inline int32_t four_codes(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// A block's int32 dot products of the tile's rows (lanes) with 32 activation codes of 7 bits.
static inline __attribute__((always_inline)) ivec block_dot7(const ivec *w, const int8_t *a) {
    ivec s0 = I_ZERO(), s1 = I_ZERO();  // two chains: dpbusd's latency is five cycles
#pragma GCC unroll 4
    for (int k = 0; k < 8; k += 2) {
        s0 = DPBUSD(s0, w[k], SET1_I32(four_codes(a + 4 * k)));
        s1 = DPBUSD(s1, w[k + 1], SET1_I32(four_codes(a + 4 * k + 4)));
    }
    return ADD32(s0, s1);
}

// The same with a row's 14-bit codes (128 h + l), from index `at` of its rows: exact in int32 (|.| < 2^27).
static inline __attribute__((always_inline)) ivec block_dot(const ivec *w, const acts *a, int64_t at) {
    return ADD32(SLL32(block_dot7(w, a->hi + at), 7), block_dot7(w, a->lo + at));
}

// One 4-bit tile against `rows` activation rows (a constant once inlined: the accumulators stay in
// registers): res [rows, TILE].
static inline __attribute__((always_inline)) void q4_tile(const uint8_t *codes, const uint16_t *scales, int64_t G,
                                                          int64_t K, const acts *a, int64_t r0, const int rows,
                                                          float *res) {
    fvec acc[PASS_ROWS];
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++) acc[i] = F_ZERO();
    const ivec nibble = SET1_I8(0x0F);
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *c = codes + g * 16 * TILE;
        ivec w[8];
#pragma GCC unroll 4
        for (int ch = 0; ch < 4; ch++) {
            const ivec v = LOAD_I(c + ch * 4 * TILE);
            w[ch] = AND_I(v, nibble);
            w[ch + 4] = AND_I(SRL16(v, 4), nibble);
        }
        const fvec dw = HALVES(scales + g * 2 * TILE), mw = HALVES(scales + g * 2 * TILE + TILE);
#pragma GCC unroll 8
        for (int i = 0; i < rows; i++) {
            const int64_t r = r0 + i;
            acc[i] = FMA_F(CVT_F(block_dot(w, a, r * K + g * QK)), MUL_F(dw, SET1_F(a->d[r * G + g])), acc[i]);
            acc[i] = FMA_F(mw, SET1_F(a->s[r * G + g]), acc[i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++) STORE_F(res + i * TILE, acc[i]);
}

// Calls CALL(n) with n == rows as a constant (1 .. PASS_ROWS), so each row count gets its own inlined tile
// loop with its accumulators in registers.
#define WITH_CONSTANT_ROWS(rows, CALL)                                                                       \
    switch (rows) {                                                                                          \
        case 1: CALL(1); break;                                                                              \
        case 2: CALL(2); break;                                                                              \
        case 3: CALL(3); break;                                                                              \
        case 4: CALL(4); break;                                                                              \
        case 5: CALL(5); break;                                                                              \
        case 6: CALL(6); break;                                                                              \
        case 7: CALL(7); break;                                                                              \
        default: CALL(8); break;                                                                             \
    }

// A 4-bit weight's arrays.
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales;
} q4_weights;

// Tile t of a 4-bit weight against activation rows r0 .. r0 + rows - 1 (rows <= PASS_ROWS): res [rows, TILE].
static void q4_pass(const void *weights, int64_t t, int64_t G, int64_t K, const acts *a, int64_t r0, int rows,
                    float *res) {
    const q4_weights *w = weights;
    const uint8_t *codes = w->codes + t * G * 16 * TILE;
    const uint16_t *scales = w->scales + t * G * 2 * TILE;
#define Q4_TILE(n) q4_tile(codes, scales, G, K, a, r0, n, res)
    WITH_CONSTANT_ROWS(rows, Q4_TILE);
#undef Q4_TILE
}

typedef void (*tile_pass)(const void *weights, int64_t t, int64_t G, int64_t K, const acts *a, int64_t r0, int rows,
                          float *res);

// out [M, N] = x [M, K] . W^T (+ bias [N]), tile by tile of W through `pass`. Returns 0 on success.
static int tiled(const float *x, int64_t M, int64_t K, int64_t N, const float *bias, float *out, tile_pass pass,
                 const void *weights) {
    const int64_t G = K / QK, tiles = (N + TILE - 1) / TILE;
    acts a;
    if (quantize(x, M, K, &a) != 0) {
        acts_free(&a);
        return 1;
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int valid = N - t * TILE < TILE ? (int)(N - t * TILE) : TILE;
        for (int64_t r0 = 0; r0 < M; r0 += PASS_ROWS) {
            const int rows = M - r0 < PASS_ROWS ? (int)(M - r0) : PASS_ROWS;
            float res[PASS_ROWS * TILE];
            pass(weights, t, G, K, &a, r0, rows, res);
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < valid; j++)
                    out[(r0 + i) * N + t * TILE + j] = res[i * TILE + j] + (bias ? bias[t * TILE + j] : 0.0f);
        }
    }
    acts_free(&a);
    return 0;
}

// out [M, N] = x [M, K] . W^T (+ bias [N]); W as 4-bit tiles (the layout above). Returns 0 on success.
int q4_gemm(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales, int64_t N,
            const float *bias, float *out) {
    const q4_weights w = {codes, scales};
    return tiled(x, M, K, N, bias, out, q4_pass, &w);
}

// One int8 tile against `rows` activation rows: res [rows, TILE] before the row scales.
static inline __attribute__((always_inline)) void q8_tile(const uint8_t *w8, int64_t G, int64_t K, const acts *a,
                                                          int64_t r0, const int rows, float *res) {
    fvec acc[PASS_ROWS];
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++) acc[i] = F_ZERO();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *c = w8 + g * 32 * TILE;
        ivec w[8];
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) w[k] = LOAD_I(c + k * 4 * TILE);
#pragma GCC unroll 8
        for (int i = 0; i < rows; i++) {
            const int64_t r = r0 + i;
            // (w + 128) . q, less 128 sum(q)
            const ivec dot = SUB32(block_dot(w, a, r * K + g * QK), SET1_I32(128 * a->sum[r * G + g]));
            acc[i] = FMA_F(CVT_F(dot), SET1_F(a->d[r * G + g]), acc[i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++) STORE_F(res + i * TILE, acc[i]);
}

// An int8 weight's arrays.
typedef struct {
    const uint8_t *w8;
    const float *scale;
} q8_weights;

// Tile t of an int8 weight against activation rows r0 .. r0 + rows - 1 (rows <= PASS_ROWS): res [rows, TILE].
static void q8_pass(const void *weights, int64_t t, int64_t G, int64_t K, const acts *a, int64_t r0, int rows,
                    float *res) {
    const q8_weights *w = weights;
    const uint8_t *w8 = w->w8 + t * G * 32 * TILE;
#define Q8_TILE(n) q8_tile(w8, G, K, a, r0, n, res)
    WITH_CONSTANT_ROWS(rows, Q8_TILE);
#undef Q8_TILE
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < TILE; j++) res[i * TILE + j] *= w->scale[t * TILE + j];
}

// out [M, N] = x [M, K] . (W * scale[:, None])^T (+ bias [N]); W as int8 tiles (the layout above), scale
// [tiles * TILE]. Returns 0 on success.
int q8_gemm(const float *x, int64_t M, int64_t K, const uint8_t *w8, const float *scale, int64_t N,
            const float *bias, float *out) {
    const q8_weights w = {w8, scale};
    return tiled(x, M, K, N, bias, out, q8_pass, &w);
}
