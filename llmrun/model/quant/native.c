/* llmrun's native kernels: a float32 CPU decode step's products with quantized (and float32) weights, its
   small ops (RMSNorm, SiLU·mul, RoPE), its attention, and whole blocks of it in one call.

   Compiled on the machine that runs them (by llmrun.loading.native_kernels, with -O3 -march=native
   -fopenmp) and called through ctypes (llmrun.model.quant.native). The codes are read as they are
   stored (llmrun.model.quant.weight); the scales come in the kernels' own form:
   * 4-bit: codes uint8 (N, K/2), column 2j in byte j's high nibble and 2j+1 in its low one;
     w = code * scale + offset, with a scale and an offset (the stored zero - 8 scale) per group;
   * 8-bit: codes int8 (N, K); w = code * scale, a scale per group (a group of K: per channel).
   Scales and offsets are (N, K/group), contiguous, float32 or (`half`) _Float16. Groups are a whole
   number of 32-column blocks. In the float32 forms sums are in float32 with float32 activations, so a
   product equals the dequantized float32 one up to float32 rounding: no step rounds the activations.
   With AVX2 and FMA the inner loops are written with intrinsics, four weight rows at a time where
   asked (`tiled`); elsewhere the same loops in plain C, which the compiler vectorizes as it can.
   AVX2 builds also have a 16-bit form (`x16`): each 32-column block of x is rounded to int16 codes
   times a float32 step (its largest magnitude / 32767), and each block's sums are integer
   multiply-adds of codes by codes (vpmaddwd), converted to float32 once per block: about half the
   instructions per weight of the float32 form, at an error per element of x of at most half a step
   (2^-16 of its block's largest magnitude; bf16 rounds to 2^-9 of each element).
   Rows of W are shared among `threads` OpenMP threads. */

#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLMRUN_AVX2 1
#endif

#define BLOCK 32 /* columns per inner step */
#define TILE 4   /* weight rows per step of the tiled AVX2 kernels */
#define PREFETCH_ROWS 8 /* rows ahead whose codes the tiled kernels ask the cache for (else latency-bound) */
#define F32_PREFETCH_ROWS 32 /* the same for float32 rows (of 8, 16 and 32, the fastest on an AMD EPYC Zen 3) */

/* element i of a float32 (half = 0) or float16 (half = 1) array */
static inline float value(const void *values, int64_t i, int half) {
    if (!half) return ((const float *)values)[i];
#ifdef __F16C__
    return _cvtsh_ss(((const uint16_t *)values)[i]);
#else
    return (float)((const _Float16 *)values)[i];
#endif
}

#ifdef LLMRUN_AVX2
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* e^x for eight floats (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n), within 2 ulp
   of expf; x is clamped to [-87.3, 88.3], where e^x is a normal float */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: r exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

static inline __m256 bytes_to_floats(__m128i eight_in_low_half, int is_signed) {
    __m256i wide = is_signed ? _mm256_cvtepi8_epi32(eight_in_low_half) : _mm256_cvtepu8_epi32(eight_in_low_half);
    return _mm256_cvtepi32_ps(wide);
}

/* acc0, acc1 += scale * (one block's 32 codes) * x0..x3, the codes in the order of x as the kernels lay it
   out: 4-bit, the 16 high nibbles (even columns) then the 16 low ones (odd columns); 8-bit, as stored */
static inline __attribute__((always_inline)) void block_product(const uint8_t *codes, int bits, __m256 scale,
                                                                __m256 x0, __m256 x1, __m256 x2, __m256 x3,
                                                                __m256 *acc0, __m256 *acc1) {
    __m128i a, b;
    if (bits == 4) {
        __m128i v = _mm_loadu_si128((const __m128i *)codes), mask = _mm_set1_epi8(15);
        a = _mm_and_si128(_mm_srli_epi16(v, 4), mask), b = _mm_and_si128(v, mask);
    } else {
        __m256i v = _mm256_loadu_si256((const __m256i *)codes);
        a = _mm256_castsi256_si128(v), b = _mm256_extracti128_si256(v, 1);
    }
    int is_signed = bits == 8;
    *acc0 = _mm256_fmadd_ps(_mm256_mul_ps(bytes_to_floats(a, is_signed), scale), x0, *acc0);
    *acc1 = _mm256_fmadd_ps(_mm256_mul_ps(bytes_to_floats(_mm_srli_si128(a, 8), is_signed), scale), x1, *acc1);
    *acc0 = _mm256_fmadd_ps(_mm256_mul_ps(bytes_to_floats(b, is_signed), scale), x2, *acc0);
    *acc1 = _mm256_fmadd_ps(_mm256_mul_ps(bytes_to_floats(_mm_srli_si128(b, 8), is_signed), scale), x3, *acc1);
}

/* out[r] = sum over the columns of scale(r, group) * code(r) * x, for `rows` (1 or TILE) weight rows
   at once: each block of x is loaded once for them. Inlined where `bits` and `rows` are constants. */
static inline __attribute__((always_inline)) void dot_rows(const uint8_t *codes, int64_t code_row, int bits,
                                                          const void *scales, int half, const float *x, int64_t k,
                                                          int64_t group, int rows, float *out) {
    int64_t groups = k / group, blocks = group / BLOCK, block_bytes = BLOCK * bits / 8;
    __m256 acc[TILE][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0, b = 0; g < groups; g++) {
        __m256 scale[TILE];
        for (int r = 0; r < rows; r++) scale[r] = _mm256_set1_ps(value(scales, r * groups + g, half));
        for (int64_t end = b + blocks; b < end; b++) {
            const float *xb = x + b * BLOCK;
            __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
            __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
            for (int r = 0; r < rows; r++) {
                const uint8_t *c = codes + r * code_row + b * block_bytes;
                if (rows > 1) _mm_prefetch((const char *)(c + PREFETCH_ROWS * code_row), _MM_HINT_T0);
                block_product(c, bits, scale[r], x0, x1, x2, x3, &acc[r][0], &acc[r][1]);
            }
        }
    }
    for (int r = 0; r < rows; r++) out[r] = sum8(_mm256_add_ps(acc[r][0], acc[r][1]));
}

/* dot_rows for x in the 16-bit form: xq int16 codes laid out as x is (see llmrun_gemv), xstep the step of
   each 32-column block. A block's 32 products are summed in int32 (at most 2^24 in magnitude: exact),
   then added in float32 times scale(r, group) * step. */
static inline __attribute__((always_inline)) void dot_rows_x16(const uint8_t *codes, int64_t code_row, int bits,
                                                              const void *scales, int half, const int16_t *xq,
                                                              const float *xstep, int64_t k, int64_t group, int rows,
                                                              float *out) {
    int64_t groups = k / group, blocks = group / BLOCK, block_bytes = BLOCK * bits / 8;
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi16(15);
    for (int64_t g = 0, b = 0; g < groups; g++) {
        __m256 scale[TILE];
        for (int r = 0; r < rows; r++) scale[r] = _mm256_set1_ps(value(scales, r * groups + g, half));
        for (int64_t end = b + blocks; b < end; b++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * BLOCK));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + b * BLOCK + 16));
            __m256 step = _mm256_broadcast_ss(xstep + b);
            for (int r = 0; r < rows; r++) {
                const uint8_t *c = codes + r * code_row + b * block_bytes;
                if (rows > 1) _mm_prefetch((const char *)(c + PREFETCH_ROWS * code_row), _MM_HINT_T0);
                __m256i sums;
                if (bits == 4) {
                    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)c));
                    sums = _mm256_add_epi32(_mm256_madd_epi16(_mm256_srli_epi16(v, 4), x0),
                                            _mm256_madd_epi16(_mm256_and_si256(v, mask), x1));
                } else {
                    __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)c));
                    __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 16)));
                    sums = _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
                }
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(scale[r], step), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) out[r] = sum8(acc[r]);
}

/* xq (K) int16 and xstep (K / BLOCK) = x (K) in the 16-bit form: per block, step = max |x| / 32767 and
   code = round(x / step) (0 for a block of zeros) */
static void round_to_x16(const float *x, int16_t *xq, float *xstep, int64_t k) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < k / BLOCK; b++) {
        __m256 v[4], top = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + b * BLOCK + 8 * i);
            top = _mm256_max_ps(top, _mm256_and_ps(v[i], magnitude));
        }
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        float largest = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
        __m256 inverse = _mm256_set1_ps(largest > 0 ? 32767.0f / largest : 0);
        for (int i = 0; i < 4; i += 2) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], inverse));
            /* packs interleaves the 128-bit lanes of a and c; the permute puts them back in order */
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
            _mm256_storeu_si256((__m256i *)(xq + b * BLOCK + 8 * i), packed);
        }
        xstep[b] = largest / 32767.0f;
    }
}
#else
static inline void dot_rows(const uint8_t *codes, int64_t code_row, int bits, const void *scales, int half,
                            const float *x, int64_t k, int64_t group, int rows, float *out) {
    int64_t groups = k / group;
    for (int r = 0; r < rows; r++) {
        const uint8_t *c = codes + r * code_row;
        float total = 0;
        for (int64_t g = 0; g < groups; g++) {
            float d = 0;
            for (int64_t at = g * group; at < (g + 1) * group; at += BLOCK) {
                if (bits == 4) {
                    const uint8_t *cb = c + at / 2;
                    for (int j = 0; j < BLOCK / 2; j++)
                        d += (float)(cb[j] >> 4) * x[at + j] + (float)(cb[j] & 15) * x[at + BLOCK / 2 + j];
                } else {
                    for (int j = 0; j < BLOCK; j++) d += (float)((const int8_t *)c)[at + j] * x[at + j];
                }
            }
            total += value(scales, r * groups + g, half) * d;
        }
        out[r] = total;
    }
}
#endif

/* sum over g < groups of offsets[g] sums[g]: a 4-bit row's offset terms, eight groups at a time where
   the build has AVX2 (a scalar chain of them cost as much as the row's codes) */
static inline float offset_terms(const void *offsets, int half, const float *sums, int64_t groups) {
    int64_t g = 0;
    float total = 0;
#ifdef LLMRUN_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; g + 8 <= groups; g += 8) {
        __m256 o = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)offsets + g)))
                        : _mm256_loadu_ps((const float *)offsets + g);
        acc = _mm256_fmadd_ps(o, _mm256_loadu_ps(sums + g), acc);
    }
    total = sum8(acc);
#endif
    for (; g < groups; g++) total += value(offsets, g, half) * sums[g];
    return total;
}

/* whether the build has the AVX2 forms: llmrun_gemv's `tiled` and `x16`, and llmrun_gemv_f32 */
int llmrun_vectorized(void) {
#ifdef LLMRUN_AVX2
    return 1;
#else
    return 0;
#endif
}

/* A quantized weight (N, K) as the products take it: its codes, scales and offsets (see the top of this
   file; `half`: float16 scales and offsets), and the form of product to run on it (`tiled`, `x16`).
   Made once per weight (llmrun.model.quant.native.Operand): a call then passes one pointer. */
typedef struct {
    const uint8_t *codes;
    const void *scales, *offsets;
    int64_t n, k, group;
    int32_t bits, half, tiled, x16;
} llmrun_operand;

/* y (M, N) = x (M, K) W^T, or y += x W^T (`accumulate`), rows of y `y_row` apart. 4-bit: each row's
   product is its codes' scaled sum plus, per group, the offset times the sum of x over the group; x is
   first laid out block by block as even columns then odd ones (the codes' nibble order). `x16` (AVX2
   builds): x in the 16-bit form. scratch: M * (3K / 2 + K / BLOCK + K / group) floats: x laid out,
   its int16 codes, the blocks' steps, the group sums. */
void llmrun_gemv(const float *x, const llmrun_operand *w, float *y, int64_t y_row, float *scratch, int64_t m_rows,
                 int accumulate, int threads) {
    const uint8_t *codes = w->codes;
    const void *scales = w->scales, *offsets = w->offsets;
    int64_t n = w->n, k = w->k, group = w->group;
    int bits = w->bits, half = w->half, x16 = w->x16;
    int64_t groups = k / group, code_row = k * bits / 8;
    float *laid_out = scratch, *xsteps = scratch + m_rows * k * 3 / 2, *group_sums = xsteps + m_rows * (k / BLOCK);
    const float *xs = x;
    for (int64_t m = 0; m < m_rows; m++) {
        const float *xm = x + m * k;
        if (bits == 4) {
            for (int64_t at = 0; at < k; at += BLOCK)
                for (int j = 0; j < BLOCK / 2; j++) {
                    laid_out[m * k + at + j] = xm[at + 2 * j];
                    laid_out[m * k + at + BLOCK / 2 + j] = xm[at + 2 * j + 1];
                }
            for (int64_t g = 0; g < groups; g++) {
                float sum = 0;
                for (int64_t j = g * group; j < (g + 1) * group; j++) sum += xm[j];
                group_sums[m * groups + g] = sum;
            }
            xs = laid_out;
        }
    }
    int64_t step = 1;
#ifdef LLMRUN_AVX2
    int16_t *xq = (int16_t *)(scratch + m_rows * k);
    if (x16)
        for (int64_t m = 0; m < m_rows; m++) round_to_x16(xs + m * k, xq + m * k, xsteps + m * (k / BLOCK), k);
    if (w->tiled && n % TILE == 0) step = TILE;
#else
    (void)x16, (void)xsteps;
#endif
    int64_t scale_bytes = half ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < n; row += step)
        for (int64_t m = 0; m < m_rows; m++) {
            float out[TILE];
            const uint8_t *c = codes + row * code_row;
            const void *s = (const char *)scales + row * groups * scale_bytes;
#ifdef LLMRUN_AVX2
            if (x16) {
                const int16_t *xm = xq + m * k;
                const float *sm = xsteps + m * (k / BLOCK);
                if (bits == 4 && step == TILE) dot_rows_x16(c, code_row, 4, s, half, xm, sm, k, group, TILE, out);
                else if (bits == 4) dot_rows_x16(c, code_row, 4, s, half, xm, sm, k, group, 1, out);
                else if (step == TILE) dot_rows_x16(c, code_row, 8, s, half, xm, sm, k, group, TILE, out);
                else dot_rows_x16(c, code_row, 8, s, half, xm, sm, k, group, 1, out);
            } else
#endif
            if (bits == 4 && step == TILE) dot_rows(c, code_row, 4, s, half, xs + m * k, k, group, TILE, out);
            else if (bits == 4) dot_rows(c, code_row, 4, s, half, xs + m * k, k, group, 1, out);
            else if (step == TILE) dot_rows(c, code_row, 8, s, half, xs + m * k, k, group, TILE, out);
            else dot_rows(c, code_row, 8, s, half, xs + m * k, k, group, 1, out);
            for (int64_t r = 0; r < step; r++) {
                if (bits == 4)
                    out[r] += offset_terms((const char *)offsets + (row + r) * groups * scale_bytes, half,
                                           group_sums + m * groups, groups);
                float *target = y + m * y_row + row + r;
                *target = accumulate ? *target + out[r] : out[r];
            }
        }
}

/* y (M, N) = x (M, K) W^T, or y += x W^T (`accumulate`), for a float32 W (N, K), N a multiple of TILE and K
   of 16 (AVX2 builds only: see llmrun_vectorized): four rows at a time, the next rows prefetched. */
void llmrun_gemv_f32(const float *x, const float *w, float *y, int64_t m_rows, int64_t n, int64_t k, int accumulate,
                     int threads) {
#ifdef LLMRUN_AVX2
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < n; row += TILE)
        for (int64_t m = 0; m < m_rows; m++) {
            const float *xm = x + m * k;
            __m256 acc[TILE][2];
            for (int r = 0; r < TILE; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int64_t j = 0; j < k; j += 16) {
                __m256 x0 = _mm256_loadu_ps(xm + j), x1 = _mm256_loadu_ps(xm + j + 8);
                for (int r = 0; r < TILE; r++) {
                    const float *wr = w + (row + r) * k + j;
                    _mm_prefetch((const char *)(wr + F32_PREFETCH_ROWS * k), _MM_HINT_T0);
                    acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(wr), x0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 8), x1, acc[r][1]);
                }
            }
            float *out = y + m * n + row;
            for (int r = 0; r < TILE; r++) {
                float v = sum8(_mm256_add_ps(acc[r][0], acc[r][1]));
                out[r] = accumulate ? out[r] + v : v;
            }
        }
#else
    (void)x, (void)w, (void)y, (void)m_rows, (void)n, (void)k, (void)accumulate, (void)threads;
#endif
}

/* out (R, K) float32 = rows first .. first + R - 1 of the weight, dequantized */
void llmrun_dequant(const llmrun_operand *w, float *out, int64_t first, int64_t rows, int threads) {
    int64_t k = w->k, group = w->group, groups = k / group;
    int half = w->half;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        int64_t row = first + r;
        float *o = out + r * k;
        for (int64_t g = 0; g < groups; g++) {
            float s = value(w->scales, row * groups + g, half);
            if (w->bits == 4) {
                const uint8_t *c = w->codes + row * (k / 2);
                float z = value(w->offsets, row * groups + g, half);
                for (int64_t j = g * group / 2; j < (g + 1) * group / 2; j++) {
                    o[2 * j] = (float)(c[j] >> 4) * s + z;
                    o[2 * j + 1] = (float)(c[j] & 15) * s + z;
                }
            } else {
                const int8_t *c = (const int8_t *)w->codes + row * k;
                for (int64_t j = g * group; j < (g + 1) * group; j++) o[j] = (float)c[j] * s;
            }
        }
    }
}

/* out = x / sqrt(mean(x^2) + eps) * weight for M rows of D (RMSNorm in float32), on one thread: the
   decode step's norms, one call where PyTorch's ops took five. Rows are D apart in x and out. */
void llmrun_rms_norm(const float *x, const float *weight, float *out, int64_t m_rows, int64_t d, float eps) {
    for (int64_t m = 0; m < m_rows; m++) {
        const float *xm = x + m * d;
        float sum = 0;
        for (int64_t j = 0; j < d; j++) sum += xm[j] * xm[j];
        float scale = 1.0f / sqrtf(sum / (float)d + eps);
        for (int64_t j = 0; j < d; j++) out[m * d + j] = xm[j] * scale * weight[j];
    }
}

/* out = silu(gate) * up for M rows of N in float32, on one thread; each tensor's rows `*_row` apart */
void llmrun_silu_mul(const float *gate, const float *up, float *out, int64_t m_rows, int64_t n, int64_t gate_row,
                     int64_t up_row, int64_t out_row) {
    for (int64_t m = 0; m < m_rows; m++) {
        const float *g = gate + m * gate_row, *u = up + m * up_row;
        float *o = out + m * out_row;
        int64_t j = 0;
#ifdef LLMRUN_AVX2
        for (; j + 8 <= n; j += 8) {
            __m256 gj = _mm256_loadu_ps(g + j), one = _mm256_set1_ps(1.0f);
            __m256 silu = _mm256_div_ps(gj, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gj))));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(u + j)));
        }
#endif
        for (; j < n; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* One layer's attention in a float32 decode step (llmrun.model.fastpath.cpu), for B rows at position
   `pos` of the cache, H query heads and Hkv key/value heads of D (query head j reads key/value head
   j / (H / Hkv)). Made once per layer (llmrun.model.quant.native.Attention). */
typedef struct {
    const float *qkv;         /* (B, (H + 2 Hkv) D), rows qkv_row apart: q heads, k heads, v heads */
    int64_t qkv_row;
    const float *cos, *sin;   /* (H + Hkv, D): this step's RoPE angles, q's rows times 1/sqrt(D) */
    float *qk;                /* (B, H + Hkv, D): q and k rotated */
    float *k, *v;             /* the cache, (B, Hkv, S_max, D) each */
    float *o;                 /* (B, H D): attention's output */
    float *scores;            /* scratch: S_max floats per thread */
    int64_t batch, heads, kv_heads, d, s_max;
} llmrun_attention;

/* qk = RoPE of qkv's q and k heads: x cos + x[(j + D/2) mod D] sin, sin signed for rotate_half */
void llmrun_rope(const llmrun_attention *a) {
    int64_t rows = a->heads + a->kv_heads, d = a->d, half = d / 2;
    for (int64_t b = 0; b < a->batch; b++)
        for (int64_t r = 0; r < rows; r++) {
            const float *x = a->qkv + b * a->qkv_row + r * d, *c = a->cos + r * d, *s = a->sin + r * d;
            float *out = a->qk + (b * rows + r) * d;
            for (int64_t j = 0; j < half; j++) out[j] = x[j] * c[j] + x[j + half] * s[j];
            for (int64_t j = half; j < d; j++) out[j] = x[j] * c[j] + x[j - half] * s[j];
        }
}

/* scores[t] = q . k[t] (rows of D) for t < n; returns the largest */
static float key_scores(const float *q, const float *k, int64_t n, int64_t d, float *scores) {
    float top = -INFINITY;
    int64_t t = 0;
#ifdef LLMRUN_AVX2
    if (d % 8 == 0)
        for (; t + 4 <= n; t += 4) { /* four keys at a time: four independent chains of FMAs */
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t j = 0; j < d; j += 8) {
                __m256 qj = _mm256_loadu_ps(q + j);
                for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(k + (t + i) * d + j), acc[i]);
            }
            for (int i = 0; i < 4; i++) {
                scores[t + i] = sum8(acc[i]);
                top = scores[t + i] > top ? scores[t + i] : top;
            }
        }
#endif
    for (; t < n; t++) {
        float total = 0;
        for (int64_t j = 0; j < d; j++) total += q[j] * k[t * d + j];
        scores[t] = total;
        top = total > top ? total : top;
    }
    return top;
}

/* o (D) = sum over t < n of p[t] * v[t] (rows of D) */
static void weighted_values(const float *p, const float *v, int64_t n, int64_t d, float *o) {
    int64_t j = 0;
#ifdef LLMRUN_AVX2
    for (; j + 64 <= d; j += 64) { /* 64 columns per pass: eight independent chains of FMAs */
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            __m256 pt = _mm256_broadcast_ss(p + t);
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + t * d + j + 8 * i), acc[i]);
        }
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + j + 8 * i, acc[i]);
    }
    for (; j + 16 <= d; j += 16) { /* what is left, 16 columns (a 64-byte line of each row) per pass */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            __m256 pt = _mm256_broadcast_ss(p + t);
            a0 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + t * d + j), a0);
            a1 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + t * d + j + 8), a1);
        }
        _mm256_storeu_ps(o + j, a0), _mm256_storeu_ps(o + j + 8, a1);
    }
#endif
    for (; j < d; j++) {
        float total = 0;
        for (int64_t t = 0; t < n; t++) total += p[t] * v[t * d + j];
        o[j] = total;
    }
}

/* The rotated k and the v of position `pos` into the cache, then o = softmax(q K^T) V over the keys
   start .. end - 1 for every query head (q carries the 1/sqrt(D) scale), query heads shared among
   `threads` OpenMP threads. */
void llmrun_attend(const llmrun_attention *a, int64_t pos, int64_t start, int64_t end, int threads) {
    int64_t h = a->heads, hkv = a->kv_heads, d = a->d, group = h / hkv, n = end - start;
    for (int64_t b = 0; b < a->batch; b++)
        for (int64_t kv = 0; kv < hkv; kv++) {
            int64_t at = ((b * hkv + kv) * a->s_max + pos) * d;
            const float *k_new = a->qk + (b * (h + hkv) + h + kv) * d;
            const float *v_new = a->qkv + b * a->qkv_row + (h + hkv + kv) * d;
            for (int64_t j = 0; j < d; j++) a->k[at + j] = k_new[j], a->v[at + j] = v_new[j];
        }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t item = 0; item < a->batch * h; item++) {
        int64_t b = item / h, head = item % h;
#ifdef _OPENMP
        float *scores = a->scores + omp_get_thread_num() * a->s_max;
#else
        float *scores = a->scores;
#endif
        const float *q = a->qk + (b * (h + hkv) + head) * d;
        int64_t cache = (b * hkv + head / group) * a->s_max * d;
        const float *k = a->k + cache + start * d, *v = a->v + cache + start * d;
        float top = key_scores(q, k, n, d, scores), total = 0;
        int64_t t = 0;
#ifdef LLMRUN_AVX2
        __m256 sums = _mm256_setzero_ps(), shift = _mm256_set1_ps(top);
        for (; t + 8 <= n; t += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), shift));
            _mm256_storeu_ps(scores + t, e);
            sums = _mm256_add_ps(sums, e);
        }
        total = sum8(sums);
#endif
        for (; t < n; t++) total += scores[t] = expf(scores[t] - top);
        for (t = 0; t < n; t++) scores[t] /= total;
        weighted_values(scores, v, n, d, a->o + b * h * d + head * d);
    }
}

/* One product of a decode layer: a quantized operand, or (quant NULL) a float32 weight (N, K) */
typedef struct {
    const llmrun_operand *quant;
    const float *dense;
    int64_t n, k;
} llmrun_product;

/* One block of a float32 decode step, every product native (llmrun.model.quant.native.Layer): x (B, d) the
   residual stream, h (B, d) its normalised copy, qkv and gate_up (B, 2f) the products' outputs, act (B, f). */
typedef struct {
    float *x, *h, *qkv, *gate_up, *act, *scratch; /* scratch: the quantized products' (see llmrun_gemv) */
    const float *attn_norm, *mlp_norm;
    float eps;
    int64_t batch, d, f;
    llmrun_product qkv_proj, o_proj, gate_up_proj, down_proj;
    const llmrun_attention *attention;
} llmrun_layer;

static void run_product(const llmrun_product *p, const float *x, float *y, float *scratch, int64_t m_rows,
                        int accumulate, int threads) {
    if (p->quant) llmrun_gemv(x, p->quant, y, p->n, scratch, m_rows, accumulate, threads);
    else llmrun_gemv_f32(x, p->dense, y, m_rows, p->n, p->k, accumulate, threads);
}

/* The block's ops in the order of llmrun.model.fastpath.step.FastDecoder._layers: norm, q/k/v, RoPE,
   attention over keys start .. end - 1 (on `attention_threads`), o_proj added to x, norm, gate/up,
   SiLU·mul, down_proj added to x; the products on `threads` */
void llmrun_decode_layer(const llmrun_layer *l, int64_t pos, int64_t start, int64_t end, int attention_threads,
                         int threads) {
    int64_t b = l->batch;
    llmrun_rms_norm(l->x, l->attn_norm, l->h, b, l->d, l->eps);
    run_product(&l->qkv_proj, l->h, l->qkv, l->scratch, b, 0, threads);
    llmrun_rope(l->attention);
    llmrun_attend(l->attention, pos, start, end, attention_threads);
    run_product(&l->o_proj, l->attention->o, l->x, l->scratch, b, 1, threads);
    llmrun_rms_norm(l->x, l->mlp_norm, l->h, b, l->d, l->eps);
    run_product(&l->gate_up_proj, l->h, l->gate_up, l->scratch, b, 0, threads);
    llmrun_silu_mul(l->gate_up, l->gate_up + l->f, l->act, b, l->f, 2 * l->f, 2 * l->f, l->f);
    run_product(&l->down_proj, l->act, l->x, l->scratch, b, 1, threads);
}
