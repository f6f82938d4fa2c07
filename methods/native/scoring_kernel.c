/*
 * ovss scoring kernel: bilinear upsampling (align_corners=False) of (Q, h, w) cosine logits to
 * (Q, H, W), fused with the per-pixel decisions of methods/scoring.py: the best query, whether
 * the best two are close enough for float32 rounding to matter, and the softmax denominator
 * sum_q exp(scale * (v_q - v_best)).  The (Q, H, W) logits are never stored.
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RUN 64 /* pixels of one output row decided together (Q * RUN floats of scratch) */

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

/* Width pass: rows [r_start, r_end) of x, (Q * h) rows of length w, into tmp, laid out
 * (h, Q, W): source row i of query q goes to tmp[(i * Q + q) * W].  That layout keeps the
 * Q rows that one output row reads next to each other. */
void ovss_width_pass(const float *x, int64_t Q, int64_t h, int64_t w, int64_t W,
                     const int32_t *x0, const int32_t *x1, const float *wx0, const float *wx1,
                     int64_t r_start, int64_t r_end, float *tmp)
{
    for (int64_t r = r_start; r < r_end; r++) {
        const int64_t q = r / h, i = r % h;
        const float *src = x + r * w;
        float *dst = tmp + (i * Q + q) * W;
        for (int64_t X = 0; X < W; X++)
            dst[X] = fmaf(src[x0[X]], wx0[X], src[x1[X]] * wx1[X]);
    }
}

/* exp(x) for x <= ~0 (Cody-Waite reduction, degree-6 polynomial; relative error < 3e-7);
 * 0 below -87.  Plain arithmetic only, so that the loops calling it vectorise. */
static inline float exp_nonpos(float x)
{
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, z, r) + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n); /* 2**n (n >= -126: a normal float) */
    return p * two_n;
}

/* sum[i] += exp(v[i] * scale - sbest[i]) over one run of pixels (inlined with a constant n for
 * whole runs, which the compiler unrolls). */
static inline __attribute__((always_inline)) void accumulate_exp(float *restrict sum, const float *restrict v,
                           const float *restrict sbest, float scale, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        sum[i] += exp_nonpos(v[i] * scale - sbest[i]);
}

/* One query's values v = fma(t, a, u * b) over a run of n pixels, folded into the running
 * best, second best and best query (the first of equal values keeps its place). */
static inline __attribute__((always_inline)) void
track_best(const float *restrict t, const float *restrict u, float a, float b, int32_t q,
           int64_t n, float *restrict best, float *restrict second, int32_t *restrict bq,
           float *restrict v)
{
    for (int64_t i = 0; i < n; i++) {
        const float val = fmaf(t[i], a, u[i] * b);
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
 * tmp: the (h, Q, W) width-pass result.  For every pixel p = Y * W + X of those rows it writes
 * best_q[p] (first query of the largest value), gap[p] = scale * best - scale * second (+inf
 * with one query) and, when need_sum, denom[p] = sum_q exp(scale * v_q - scale * best).
 * Rows are taken in bands that read the same two source rows, and each band in runs of RUN
 * pixels, so that the 2 * Q * RUN source values of a run stay in cache for the whole band.
 * Returns 0, or -1 when the scratch buffer cannot be allocated.
 */
int ovss_score_rows(const float *tmp, int64_t Q, int64_t h, int64_t W, const int32_t *y0,
                    const int32_t *y1, const float *wy0, const float *wy1, int64_t y_start,
                    int64_t y_end, float scale, int need_sum, int64_t *best_q, float *gap,
                    float *denom)
{
    (void)h;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(need_sum ? Q : 1) * RUN);
    if (buf == NULL)
        return -1;
    float best[RUN], second[RUN], sum[RUN], sbest[RUN];
    int32_t bq[RUN];
    int64_t band_start = y_start;
    while (band_start < y_end) {
        int64_t band_end = band_start + 1;
        while (band_end < y_end && y0[band_end] == y0[band_start] &&
               y1[band_end] == y1[band_start])
            band_end++;
        const float *top = tmp + (int64_t)y0[band_start] * Q * W;
        const float *bot = tmp + (int64_t)y1[band_start] * Q * W;
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
                    gap[p0 + i] = Q > 1 ? sbest[i] - second[i] * scale : INFINITY;
                    sum[i] = 0.0f;
                }
                if (need_sum) {
                    for (int64_t q = 0; q < Q; q++) {
                        if (n == RUN)
                            accumulate_exp(sum, buf + q * RUN, sbest, scale, RUN);
                        else
                            accumulate_exp(sum, buf + q * RUN, sbest, scale, n);
                    }
                    for (int64_t i = 0; i < n; i++)
                        denom[p0 + i] = sum[i];
                }
            }
        }
        band_start = band_end;
    }
    free(buf);
    return 0;
}

/* The upsampled values of a list of pixels: out[q * n + k] for pixel idx[k] (= Y * W + X),
 * bitwise the values ovss_score_rows decided on. */
void ovss_pixels(const float *tmp, int64_t Q, int64_t h, int64_t W, const int32_t *y0,
                 const int32_t *y1, const float *wy0, const float *wy1, const int64_t *idx,
                 int64_t n, float *out)
{
    (void)h;
    for (int64_t k = 0; k < n; k++) {
        const int64_t Y = idx[k] / W, X = idx[k] % W;
        const float a = wy0[Y], b = wy1[Y];
        const float *top = tmp + (int64_t)y0[Y] * Q * W + X;
        const float *bot = tmp + (int64_t)y1[Y] * Q * W + X;
        for (int64_t q = 0; q < Q; q++)
            out[q * n + k] = fmaf(top[q * W], a, bot[q * W] * b);
    }
}

/* All upsampled values of rows [y_start, y_end): out is (Q, H, W). */
void ovss_height_pass(const float *tmp, int64_t Q, int64_t h, int64_t H, int64_t W,
                      const int32_t *y0, const int32_t *y1, const float *wy0, const float *wy1,
                      int64_t y_start, int64_t y_end, float *out)
{
    (void)h;
    for (int64_t q = 0; q < Q; q++)
        for (int64_t Y = y_start; Y < y_end; Y++) {
            const float a = wy0[Y], b = wy1[Y];
            const float *t = tmp + ((int64_t)y0[Y] * Q + q) * W;
            const float *u = tmp + ((int64_t)y1[Y] * Q + q) * W;
            float *o = out + (q * H + Y) * W;
            for (int64_t X = 0; X < W; X++)
                o[X] = fmaf(t[X], a, u[X] * b);
        }
}
