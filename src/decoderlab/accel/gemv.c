/* decoderlab's CPU products for decoding: y = x @ W.T + b for a few rows x and a weight stored as int8, int4 or bf16.
 *
 * Batch-1 decoding reads every weight once per token, so a product is as fast as it streams the weight bytes and
 * turns them into sums. Each kernel reads a weight row once and multiplies it into up to four rows of x at a time
 * (decode steps, batches, speculative trees); rows of W are split across OpenMP threads (torch's own runtime when
 * torch is loaded, so the two share one pool). Every row of x gets the same arithmetic whatever else is in the call.
 *
 * - bf16 and int8: widened to fp32 in registers (a 16-bit shift; a sign extension and conversion), fp32 FMA: the
 *   result is the dequantized weight's product up to summation order.
 * - int4: as llama.cpp's Q4_0 dot product, each row of x is rounded to int8 in blocks of 32 inputs (scale
 *   max|x| / 127) and the block products are summed in integers (AVX2 maddubs), then scaled in fp32: twice the
 *   products per instruction of widening, which int4 needs to keep up with memory (int8 is memory-bound either
 *   way, measured). The error this adds is that of rounding x to 8 bits, well below the 4-bit weights' own.
 *
 * Layouts (made by decoderlab.accel.kernels from a QuantizedWeight; K is a multiple of 32 everywhere):
 *   int8: q int8 [N, K], scale fp32 [N]                          w[n, k] = q[n, k] * scale[n]
 *   int4: q uint8 [N, K/32, 16], scale and offset fp32 [N, K/G]   w[n, k] = q[n, k] * scale[n, g] + offset[n, g];
 *         byte j of block b holds input 32b + j in its low nibble and input 32b + 16 + j in its high one
 *   bf16: w uint16 [N, K] (bfloat16 bits)
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define ROW_TILE 8 /* weight rows a thread takes at a time */
#define MAX_ROWS 4 /* rows of x multiplied per pass over W */

int decoderlab_kernels_version(void) { return 1; }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 weights from their stored form into four registers of 8 fp32 (inputs k..k+31 in order). */
static inline void widen_int8(const int8_t *p, __m256 w[4]) {
    __m128i a = _mm_loadu_si128((const __m128i *)p), b = _mm_loadu_si128((const __m128i *)(p + 16));
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}

static inline __m256 widen_bf16_8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static inline void widen_bf16(const uint16_t *p, __m256 w[4]) {
    for (int j = 0; j < 4; j++) w[j] = widen_bf16_8(p + 8 * j);
}

/* acc[m][j] += w[j] * x[m][k + 8j]: one accumulator per register of w keeps the FMA chains independent. */
static inline __attribute__((always_inline)) void fma_rows(const __m256 w[4], const float *x, int64_t K, int64_t k,
                                                           int mb, __m256 acc[MAX_ROWS][4]) {
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < 4; j++)
            acc[m][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + m * K + k + 8 * j), acc[m][j]);
}

static inline __attribute__((always_inline)) void zero_acc(__m256 acc[MAX_ROWS][4], int mb) {
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm256_setzero_ps();
}

static inline __attribute__((always_inline)) float reduce_acc(__m256 acc[4]) {
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

static inline __attribute__((always_inline)) void int8_row(const float *x, int64_t K, const int8_t *q, float scale,
                                                            int mb, float *out) {
    __m256 acc[MAX_ROWS][4], w[4];
    zero_acc(acc, mb);
    for (int64_t k = 0; k < K; k += 32) {
        widen_int8(q + k, w);
        fma_rows(w, x, K, k, mb, acc);
    }
    for (int m = 0; m < mb; m++) out[m] = reduce_acc(acc[m]) * scale;
}

static inline __attribute__((always_inline)) void bf16_row(const float *x, int64_t K, const uint16_t *q, int mb,
                                                            float *out) {
    __m256 acc[MAX_ROWS][4], w[4];
    zero_acc(acc, mb);
    for (int64_t k = 0; k < K; k += 32) {
        widen_bf16(q + k, w);
        fma_rows(w, x, K, k, mb, acc);
    }
    for (int m = 0; m < mb; m++) out[m] = reduce_acc(acc[m]);
}

/* The row loop shared by every format: threads take ROW_TILE weight rows at a time; each row is read once per
   pass of up to MAX_ROWS rows of x. ROW(mb) computes vals[0..mb) for weight row n and rows m0.. of x. */
#define PRODUCT_LOOP(ROW)                                                                               \
    int64_t tiles = (N + ROW_TILE - 1) / ROW_TILE;                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (tiles > 1 && (int64_t)N * K >= 65536)")             \
    for (int64_t t = 0; t < tiles; t++) {                                                               \
        int64_t n_end = (t + 1) * ROW_TILE < N ? (t + 1) * ROW_TILE : N;                                \
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {                                                  \
            int mb = M - m0 < MAX_ROWS ? (int)(M - m0) : MAX_ROWS;                                      \
            for (int64_t n = t * ROW_TILE; n < n_end; n++) {                                            \
                float vals[MAX_ROWS];                                                                   \
                switch (mb) {                                                                           \
                case 1: ROW(1); break;                                                                  \
                case 2: ROW(2); break;                                                                  \
                case 3: ROW(3); break;                                                                  \
                default: ROW(4); break;                                                                 \
                }                                                                                       \
                for (int m = 0; m < mb; m++)                                                            \
                    y[(m0 + m) * N + n] = vals[m] + (bias ? bias[n] : 0.0f);                            \
            }                                                                                           \
        }                                                                                               \
    }

void decoderlab_bf16_linear(const float *x, int64_t M, int64_t K, const uint16_t *w, const float *bias, float *y,
                            int64_t N, int threads) {
#define BF16_ROW(mb) bf16_row(x + m0 * K, K, w + n * K, mb, vals)
    PRODUCT_LOOP(BF16_ROW)
#undef BF16_ROW
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* ---- int4: x quantized per block of 32 inputs (scale max|x|/127), products in integers ---- */

/* Rows of x to int8 per block of 32: qx [M, K], scale dx [M, K/32]. */
static void quantize_x(const float *x, int64_t M, int64_t K, int8_t *qx, float *dx) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / 32; b++) {
            const float *xb = x + m * K + 32 * b;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
            float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            dx[m * (K / 32) + b] = d;
            for (int j = 0; j < 32; j++) {
                int v = (int)lrintf(xb[j] * inv);
                qx[m * K + 32 * b + j] = (int8_t)v;
            }
        }
}

static inline __m256 dot32_u4(__m256i w, __m256i qx) {
    __m256i p16 = _mm256_maddubs_epi16(w, qx); /* unsigned 0..15 times signed: at most 2 * 15 * 127 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

static inline __m256i load_u4(const uint8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p), nib = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nib), _mm_and_si128(v, nib));
}

static inline __attribute__((always_inline)) void int4_row(const int8_t *qx, const float *dx, int64_t K, int64_t G,
                                                             const uint8_t *q, const float *scale,
                                                             const float *offset, const float *xsum, int mb,
                                                             float *out) {
    __m256 acc0[MAX_ROWS], acc1[MAX_ROWS];
    int64_t groups = K / G, blocks = K / 32, b = 0;
    int shift = __builtin_ctzll((unsigned long long)(G / 32)); /* G / 32 is a power of two: block b is in group b >> shift */
    for (int m = 0; m < mb; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (; b + 1 < blocks; b += 2) {
        __m256i w0 = load_u4(q + 16 * b), w1 = load_u4(q + 16 * b + 16);
        float s0 = scale[b >> shift], s1 = scale[(b + 1) >> shift];
        for (int m = 0; m < mb; m++) {
            const int8_t *xq = qx + m * K + 32 * b;
            const float *d = dx + m * blocks + b;
            __m256 p0 = dot32_u4(w0, _mm256_loadu_si256((const __m256i *)xq));
            __m256 p1 = dot32_u4(w1, _mm256_loadu_si256((const __m256i *)(xq + 32)));
            acc0[m] = _mm256_fmadd_ps(p0, _mm256_set1_ps(d[0] * s0), acc0[m]);
            acc1[m] = _mm256_fmadd_ps(p1, _mm256_set1_ps(d[1] * s1), acc1[m]);
        }
    }
    for (; b < blocks; b++) {
        __m256i w0 = load_u4(q + 16 * b);
        for (int m = 0; m < mb; m++) {
            __m256 p0 = dot32_u4(w0, _mm256_loadu_si256((const __m256i *)(qx + m * K + 32 * b)));
            acc0[m] = _mm256_fmadd_ps(p0, _mm256_set1_ps(dx[m * blocks + b] * scale[b >> shift]), acc0[m]);
        }
    }
    for (int m = 0; m < mb; m++) /* the offsets' share: offset . (x summed per group) */
        out[m] = hsum(_mm256_add_ps(acc0[m], acc1[m])) + dot_f32(offset, xsum + m * groups, groups);
}

void decoderlab_int4_linear(const float *x, int64_t M, int64_t K, int64_t G, const uint8_t *q, const float *scale,
                             const float *offset, const float *bias, float *y, int64_t N, int threads) {
    int64_t groups = K / G;
    int8_t *qx_all = malloc((size_t)(M * K));
    float *dx_all = malloc(sizeof(float) * (size_t)(M * (K / 32)));
    float *xsum_all = malloc(sizeof(float) * (size_t)(M * groups));
    quantize_x(x, M, K, qx_all, dx_all);
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += x[m * K + k];
            xsum_all[m * groups + g] = s;
        }
#define INT4_ROW(mb)                                                                                       \
    int4_row(qx_all + m0 * K, dx_all + m0 * (K / 32), K, G, q + n * (K / 2), scale + n * groups,          \
              offset + n * groups, xsum_all + m0 * groups, mb, vals)
    PRODUCT_LOOP(INT4_ROW)
#undef INT4_ROW
    free(qx_all);
    free(dx_all);
    free(xsum_all);
}

void decoderlab_int8_linear(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scale,
                            const float *bias, float *y, int64_t N, int threads) {
#define INT8_ROW(mb) int8_row(x + m0 * K, K, q + n * K, scale[n], mb, vals)
    PRODUCT_LOOP(INT8_ROW)
#undef INT8_ROW
}
