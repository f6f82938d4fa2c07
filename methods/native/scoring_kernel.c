/*
 * ovss scoring kernel: bilinear upsampling (align_corners=False) of (Q, h, w) cosine logits to
 * (Q, H, W), fused with the per-pixel decisions of methods/scoring.py: the best query, whether
 * the best two are close enough for float32 rounding to matter, and the softmax denominator
 * sum_q exp(scale * (v_q - v_best)).  Neither the (Q, H, W) logits nor the width-resized
 * (Q, h, W) ones are stored: each thread keeps the two width-resized source rows that its
 * current band of output rows reads.
 *
 * The interpolation is separable, width first, with explicit fused multiply-adds:
 *     source index  real = max(fma(in/out, d + 0.5, -0.5), 0)
 *     width pass    t    = fma(x[x0], wx0, x[x1] * wx1)
 *     height pass   v    = fma(t[y0], wy0, t[y1] * wy1)
 * which is, value for value, what PyTorch's CPU kernel computes on the machines we measured.
 * The Python side checks that on a probe before it trusts this file for a given shape, and
 * falls back to F.interpolate otherwise, so the labels never depend on this claim.
 *
 * Built with -ffp-contract=off: every fused multiply-add is the explicit fmaf() below, none is
 * added by the compiler.  The pixel loops are written branch-free over short runs of a row so
 * that the compiler vectorises them.
 */
#include <float.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RUN 64 /* pixels of one output row decided together (Q * RUN floats of scratch) */

/* The one rounding rule of both passes, PyTorch's: p * w0 + q * w1 with q * w1 rounded first and
 * the rest fused (the AVX-512 width pass computes the same with _mm512_fmadd_ps). */
static inline float blend(float p, float w0, float q, float w1)
{
    return fmaf(p, w0, q * w1);
}

/* Source indices and weights of one axis (PyTorch's area_pixel_compute_source_index rule). */
void ovss_axis(int64_t in_size, int64_t out_size, int32_t *i0, int32_t *i1, float *w0, float *w1)
{
    const float scale = (float)in_size / (float)out_size;
    for (int64_t d = 0; d < out_size; d++) {
        float real = fmaf(scale, (float)d + 0.5f, -0.5f);
        if (real < 0.0f)
            real = 0.0f;
        int64_t idx = (int64_t)floorf(real);
        if (idx > in_size - 1)
            idx = in_size - 1;
        float lam = real - (float)idx;
        if (lam > 1.0f)
            lam = 1.0f;
        if (lam < 0.0f)
            lam = 0.0f;
        i0[d] = (int32_t)idx;
        i1[d] = (int32_t)(idx < in_size - 1 ? idx + 1 : idx);
        w1[d] = lam;
        w0[d] = 1.0f - lam;
    }
}

/* One source row (length w) resized to length W: dst[X] = fma(src[x0], wx0, src[x1] * wx1). */
static inline void width_row(const float *restrict src, int64_t W, const int32_t *restrict x0,
                             const int32_t *restrict x1, const float *restrict wx0,
                             const float *restrict wx1, float *restrict dst)
{
    for (int64_t X = 0; X < W; X++)
        dst[X] = blend(src[x0[X]], wx0[X], src[x1[X]], wx1[X]);
}

/* The width pass of many rows with one pair of axis tables.  With AVX-512, each block of 16
 * outputs whose sources lie in a window of 32 consecutive inputs (every block when upsampling)
 * takes them with two loads and two in-register permutes instead of two gathers; the
 * arithmetic is the same fused multiply-add as width_row, value for value. */
typedef struct {
    int64_t w, W;
    const int32_t *x0, *x1;
    const float *wx0, *wx1;
    int64_t *base;   /* per block of 16 outputs: the first source index of its window, or -1 */
    int32_t *rel0;   /* per output: x0 - base, x1 - base */
    int32_t *rel1;
} width_plan;

static int width_plan_init(width_plan *p, int64_t w, int64_t W, const int32_t *x0,
                           const int32_t *x1, const float *wx0, const float *wx1)
{
    p->w = w;
    p->W = W;
    p->x0 = x0;
    p->x1 = x1;
    p->wx0 = wx0;
    p->wx1 = wx1;
    const int64_t blocks = W / 16;
    p->base = (int64_t *)malloc(sizeof(int64_t) * (size_t)(blocks + 1));
    p->rel0 = (int32_t *)malloc(sizeof(int32_t) * (size_t)(W + 1));
    p->rel1 = (int32_t *)malloc(sizeof(int32_t) * (size_t)(W + 1));
    if (p->base == NULL || p->rel0 == NULL || p->rel1 == NULL) {
        free(p->base);
        free(p->rel0);
        free(p->rel1);
        return -1;
    }
    for (int64_t k = 0; k < blocks; k++) {
        const int64_t start = x0[16 * k];
        int64_t top = start;
        for (int64_t i = 16 * k; i < 16 * k + 16; i++) {
            top = x1[i] > top ? x1[i] : top;
            top = x0[i] > top ? x0[i] : top;
        }
        const int fits = top - start < 32 && start + 32 <= w && x0[16 * k] <= x0[16 * k + 15];
        p->base[k] = fits ? start : -1;
        for (int64_t i = 16 * k; i < 16 * k + 16; i++) {
            p->rel0[i] = (int32_t)(x0[i] - start);
            p->rel1[i] = (int32_t)(x1[i] - start);
        }
    }
    return 0;
}

static void width_plan_free(width_plan *p)
{
    free(p->base);
    free(p->rel0);
    free(p->rel1);
}

static inline void width_row_planned(const width_plan *p, const float *restrict src,
                                     float *restrict dst)
{
    const int64_t W = p->W;
    int64_t X = 0;
#if defined(__AVX512F__)
    for (int64_t k = 0; k < W / 16; k++) {
        const int64_t base = p->base[k];
        const int64_t o = 16 * k;
        if (base < 0) {
            for (int64_t i = o; i < o + 16; i++)
                dst[i] = blend(src[p->x0[i]], p->wx0[i], src[p->x1[i]], p->wx1[i]);
            continue;
        }
        const __m512 lo = _mm512_loadu_ps(src + base), hi = _mm512_loadu_ps(src + base + 16);
        const __m512 a = _mm512_permutex2var_ps(lo, _mm512_loadu_si512(p->rel0 + o), hi);
        const __m512 b = _mm512_permutex2var_ps(lo, _mm512_loadu_si512(p->rel1 + o), hi);
        const __m512 v = _mm512_fmadd_ps(a, _mm512_loadu_ps(p->wx0 + o),
                                         _mm512_mul_ps(b, _mm512_loadu_ps(p->wx1 + o)));
        _mm512_storeu_ps(dst + o, v);
    }
    X = (W / 16) * 16;
#endif
    for (; X < W; X++)
        dst[X] = blend(src[p->x0[X]], p->wx0[X], src[p->x1[X]], p->wx1[X]);
}

/* Source row r of every query of x (Q, h, w), width-resized, into rows (Q, W). */
static void width_rows(const float *x, int64_t Q, int64_t h, const width_plan *plan, int64_t r,
                       float *rows)
{
    for (int64_t q = 0; q < Q; q++)
        width_row_planned(plan, x + (q * h + r) * plan->w, rows + q * plan->W);
}

/* exp(x) for x <= ~0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial
 * (relative error < 2e-6, well inside the 1e-5 the max probability is promised to), times 2**n;
 * 0 below -87.  Plain arithmetic only, so that the loops calling it vectorise. */
static inline float exp_nonpos(float x)
{
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
    const float r = fmaf(n, -0.693147180559945f, x);
    float p = 8.3334519073e-3f;
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* sum[i] += exp(v[i] * scale - sbest[i]) over one run of pixels (inlined with a constant n for
 * whole runs, which the compiler unrolls). */
static inline __attribute__((always_inline)) void accumulate_exp(float *restrict sum, const float *restrict v,
                           const float *restrict sbest, float scale, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        sum[i] += exp_nonpos(fmaf(v[i], scale, -sbest[i]));
}

/* One query's values v = fma(t, a, u * b) over a run of n pixels, folded into the running
 * best, second best and best query (the first of equal values keeps its place). */
static inline __attribute__((always_inline)) void
track_best(const float *restrict t, const float *restrict u, float a, float b, int32_t q,
           int64_t n, float *restrict best, float *restrict second, int32_t *restrict bq,
           float *restrict v)
{
    for (int64_t i = 0; i < n; i++) {
        const float val = blend(t[i], a, u[i], b);
        const float bi = best[i];
        const int gt = val > bi;
        const float s2 = second[i] > val ? second[i] : val;
        second[i] = gt ? bi : s2;
        bq[i] = gt ? q : bq[i];
        best[i] = gt ? val : bi;
        v[i] = val;
    }
}

/* Height pass and decisions for output rows [y_start, y_end).
 *
 * x: the (Q, h, w) logits.  For every pixel p = Y * W + X of those rows it writes best_q[p]
 * (first query of the largest value) and unsure[p] = 1 where float32 rounding could change the
 * decision: scale * best - scale * second < tie_tol (or NaN); and, when need_sum, the max
 * probability max_prob[p] = 1 / sum_q exp(scale * v_q - scale * best), with unsure[p] = 1 also
 * where it is not finite or, when prob_thd > 0, within prob_rtol * prob_thd of prob_thd.
 * Rows are taken in bands that read the same two source rows (width-resized once per band,
 * kept while the next band reads them too), and each band in runs of RUN pixels, so that the
 * 2 * Q * RUN source values of a run stay in cache for the whole band.
 * Returns 0, or -1 when the scratch buffers cannot be allocated.
 */
int ovss_score_rows(const float *x, int64_t Q, int64_t h, int64_t w, int64_t W,
                    const int32_t *y0, const int32_t *y1, const float *wy0, const float *wy1,
                    const int32_t *x0, const int32_t *x1, const float *wx0, const float *wx1,
                    int64_t y_start, int64_t y_end, float scale, int need_sum, float tie_tol,
                    float prob_thd, float prob_rtol, int64_t *best_q, float *max_prob,
                    uint8_t *unsure)
{
    float *buf = (float *)malloc(sizeof(float) * (size_t)(need_sum ? Q : 1) * RUN);
    float *slot[2] = {(float *)malloc(sizeof(float) * (size_t)Q * (size_t)W),
                      (float *)malloc(sizeof(float) * (size_t)Q * (size_t)W)};
    int64_t held[2] = {-1, -1};
    width_plan plan;
    const int planned = width_plan_init(&plan, w, W, x0, x1, wx0, wx1) == 0;
    if (buf == NULL || slot[0] == NULL || slot[1] == NULL || !planned) {
        free(buf);
        free(slot[0]);
        free(slot[1]);
        if (planned)
            width_plan_free(&plan);
        return -1;
    }
    float best[RUN], second[RUN], sum[RUN], sbest[RUN];
    int32_t bq[RUN];
    int64_t band_start = y_start;
    while (band_start < y_end) {
        int64_t band_end = band_start + 1;
        while (band_end < y_end && y0[band_end] == y0[band_start] &&
               y1[band_end] == y1[band_start])
            band_end++;
        const int64_t r0 = y0[band_start], r1 = y1[band_start];
        if (held[0] != r0 && held[1] != r0) {
            const int k = held[0] == r1 ? 1 : 0;
            width_rows(x, Q, h, &plan, r0, slot[k]);
            held[k] = r0;
        }
        if (held[0] != r1 && held[1] != r1) {
            const int k = held[0] == r0 ? 1 : 0;
            width_rows(x, Q, h, &plan, r1, slot[k]);
            held[k] = r1;
        }
        const float *top = slot[held[0] == r0 ? 0 : 1];
        const float *bot = slot[held[0] == r1 ? 0 : 1];
        for (int64_t X0 = 0; X0 < W; X0 += RUN) {
            const int64_t n = W - X0 < RUN ? W - X0 : RUN;
            for (int64_t Y = band_start; Y < band_end; Y++) {
                const float a = wy0[Y], b = wy1[Y];
                for (int64_t i = 0; i < n; i++) {
                    best[i] = -INFINITY;
                    second[i] = -INFINITY;
                    bq[i] = 0;
                }
                for (int64_t q = 0; q < Q; q++) {
                    float *v = need_sum ? buf + q * RUN : buf;
                    if (n == RUN)
                        track_best(top + q * W + X0, bot + q * W + X0, a, b, (int32_t)q, RUN,
                                   best, second, bq, v);
                    else
                        track_best(top + q * W + X0, bot + q * W + X0, a, b, (int32_t)q, n,
                                   best, second, bq, v);
                }
                const int64_t p0 = Y * W + X0;
                for (int64_t i = 0; i < n; i++) {
                    sbest[i] = best[i] * scale;
                    best_q[p0 + i] = bq[i];
                    const float gap = Q > 1 ? sbest[i] - second[i] * scale : INFINITY;
                    unsure[p0 + i] = !(gap >= tie_tol);
                    sum[i] = 0.0f;
                }
                if (need_sum) {
                    for (int64_t q = 0; q < Q; q++) {
                        if (n == RUN)
                            accumulate_exp(sum, buf + q * RUN, sbest, scale, RUN);
                        else
                            accumulate_exp(sum, buf + q * RUN, sbest, scale, n);
                    }
                    const float band = prob_rtol * prob_thd;
                    for (int64_t i = 0; i < n; i++) {
                        const float mp = 1.0f / sum[i];
                        max_prob[p0 + i] = mp;
                        const int off = !(mp <= FLT_MAX) || (prob_thd > 0.0f &&
                                                             fabsf(mp - prob_thd) <= band);
                        unsure[p0 + i] |= (uint8_t)off;
                    }
                }
            }
        }
        band_start = band_end;
    }
    free(buf);
    free(slot[0]);
    free(slot[1]);
    width_plan_free(&plan);
    return 0;
}

/* The upsampled values of a list of pixels: out[q * n + k] for pixel idx[k] (= Y * W + X),
 * bitwise the values ovss_score_rows decided on. */
void ovss_pixels(const float *x, int64_t Q, int64_t h, int64_t w, int64_t W, const int32_t *y0,
                 const int32_t *y1, const float *wy0, const float *wy1, const int32_t *x0,
                 const int32_t *x1, const float *wx0, const float *wx1, const int64_t *idx,
                 int64_t n, float *out)
{
    for (int64_t k = 0; k < n; k++) {
        const int64_t Y = idx[k] / W, X = idx[k] % W;
        const float a = wy0[Y], b = wy1[Y];
        for (int64_t q = 0; q < Q; q++) {
            const float *s0 = x + (q * h + y0[Y]) * w, *s1 = x + (q * h + y1[Y]) * w;
            const float t = blend(s0[x0[X]], wx0[X], s0[x1[X]], wx1[X]);
            const float u = blend(s1[x0[X]], wx0[X], s1[x1[X]], wx1[X]);
            out[q * n + k] = fmaf(t, a, u * b);
        }
    }
}

/* All upsampled values of rows [y_start, y_end): out is (Q, H, W).  Returns 0, or -1 without
 * scratch memory. */
int ovss_height_pass(const float *x, int64_t Q, int64_t h, int64_t w, int64_t H, int64_t W,
                     const int32_t *y0, const int32_t *y1, const float *wy0, const float *wy1,
                     const int32_t *x0, const int32_t *x1, const float *wx0, const float *wx1,
                     int64_t y_start, int64_t y_end, float *out)
{
    float *t = (float *)malloc(sizeof(float) * 2 * (size_t)W);
    if (t == NULL)
        return -1;
    float *u = t + W;
    for (int64_t q = 0; q < Q; q++)
        for (int64_t Y = y_start; Y < y_end; Y++) {
            const float a = wy0[Y], b = wy1[Y];
            width_row(x + (q * h + y0[Y]) * w, W, x0, x1, wx0, wx1, t);
            width_row(x + (q * h + y1[Y]) * w, W, x0, x1, wx0, wx1, u);
            float *o = out + (q * H + Y) * W;
            for (int64_t X = 0; X < W; X++)
                o[X] = blend(t[X], a, u[X], b);
        }
    free(t);
    return 0;
}

/* mmseg's slide merge for queries [q_start, q_end): each query's canvas plane (H, W) is set to
 * zero, then every window's logits (n_win windows, in order) are upsampled to their box and
 * added to it: canvas += v, the same float32 additions in the same order as the reference's
 * canvas[:, y1:y2, x1:x2] += F.interpolate(...), one plane at a time so that it stays in cache.
 *
 * win[k]: the (Q, h, w) logits of window k; dims[6k..6k+5] = h, w, box height, box width, box
 * top, box left; tables[8k..8k+7] = y0, y1, wy0, wy1 (box height) and x0, x1, wx0, wx1 (box
 * width).  Returns 0, or -1 without scratch memory. */
int ovss_merge_windows(int64_t n_win, const float *const *win, const int64_t *dims,
                       void *const *tables, float *canvas, int64_t H, int64_t W,
                       int64_t q_start, int64_t q_end)
{
    int64_t scratch = 1;
    for (int64_t k = 0; k < n_win; k++)
        if (dims[6 * k] * dims[6 * k + 3] > scratch)
            scratch = dims[6 * k] * dims[6 * k + 3];
    float *tmp = (float *)malloc(sizeof(float) * (size_t)scratch);
    width_plan *plans = (width_plan *)calloc((size_t)n_win, sizeof(width_plan));
    int64_t ready = 0;
    if (tmp != NULL && plans != NULL)
        for (; ready < n_win; ready++)
            if (width_plan_init(&plans[ready], dims[6 * ready + 1], dims[6 * ready + 3],
                                (const int32_t *)tables[8 * ready + 4],
                                (const int32_t *)tables[8 * ready + 5],
                                (const float *)tables[8 * ready + 6],
                                (const float *)tables[8 * ready + 7]) != 0)
                break;
    if (tmp == NULL || plans == NULL || ready < n_win) {
        for (int64_t k = 0; k < ready; k++)
            width_plan_free(&plans[k]);
        free(plans);
        free(tmp);
        return -1;
    }
    for (int64_t q = q_start; q < q_end; q++) {
        float *plane = canvas + q * H * W;
        memset(plane, 0, sizeof(float) * (size_t)(H * W));
        for (int64_t k = 0; k < n_win; k++) {
            const int64_t h = dims[6 * k], w = dims[6 * k + 1], bh = dims[6 * k + 2];
            const int64_t bw = dims[6 * k + 3], oy = dims[6 * k + 4], ox = dims[6 * k + 5];
            const int32_t *y0 = (const int32_t *)tables[8 * k];
            const int32_t *y1 = (const int32_t *)tables[8 * k + 1];
            const float *wy0 = (const float *)tables[8 * k + 2];
            const float *wy1 = (const float *)tables[8 * k + 3];
            for (int64_t i = 0; i < h; i++)
                width_row_planned(&plans[k], win[k] + (q * h + i) * w, tmp + i * bw);
            for (int64_t Y = 0; Y < bh; Y++) {
                const float a = wy0[Y], b = wy1[Y];
                const float *restrict t = tmp + (int64_t)y0[Y] * bw;
                const float *restrict u = tmp + (int64_t)y1[Y] * bw;
                float *restrict row = plane + (oy + Y) * W + ox;
                for (int64_t X = 0; X < bw; X++)
                    row[X] += blend(t[X], a, u[X], b);
            }
        }
    }
    for (int64_t k = 0; k < n_win; k++)
        width_plan_free(&plans[k]);
    free(plans);
    free(tmp);
    return 0;
}
