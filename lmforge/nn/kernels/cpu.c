/* Fused kernels for bf16 work on the CPU: each reads its inputs once and writes its outputs once, computing
 * in fp32 (and rounding to bf16 once), where the same arithmetic in torch ops takes several passes over
 * memory. Built on first use by lmforge/nn/kernels/__init__.py (cc -O3 -march=native -fopenmp ...) and
 * called through ctypes; tests/nn/test_cpu_kernels.py checks each against its formula in float64.
 *
 * bf16 values travel as uint16_t bit patterns. Threads: OpenMP, the runtime torch itself loads
 * (libgomp.so.1), so torch.set_num_threads applies here too. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef union {
    float f;
    uint32_t u;
} bits32;

static inline float bf16_to_f32(uint16_t h) {
    bits32 b;
    b.u = (uint32_t)h << 16;
    return b.f;
}

/* Round to nearest even, as c10::BFloat16 does; NaN becomes the quiet NaN 0x7fc0. */
static inline uint16_t f32_to_bf16(float f) {
    bits32 b;
    b.f = f;
    uint32_t rounded = (b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded);
}

/* exp(x): Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial), within 2 ulp of the
 * correctly rounded value; 0 below -87.3 (where expf is subnormal or 0), +inf above 88.72 (where it
 * overflows), NaN stays NaN. Written with selects rather than fminf / fmaxf, so that loops calling it
 * vectorise (with -fno-trapping-math). */
static inline float exp_f32(float x) {
    float xc = x < -87.3f ? -87.3f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    bits32 scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    float result = x > 88.72f ? INFINITY : p * scale.f;
    return x < -87.3f ? 0.0f : result;
}

#define BLOCK 4096 /* elements per work item of the elementwise kernels */

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

/* ---- RMSNorm (Zhang & Sennrich 2019, eq. 4) over fp32 rows ----------------------------------------------
 * y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps), r saved per row. */
void rms_norm_fwd(const float *x, const float *w, float *y, float *rstd, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * dim;
        float *yi = y + i * dim;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < dim; j++) ss += xi[j] * xi[j];
        float r = 1.0f / sqrtf(ss / (float)dim + eps);
        rstd[i] = r;
#pragma omp simd
        for (int64_t j = 0; j < dim; j++) yi[j] = w[j] * (xi[j] * r);
    }
}

/* dL/dx = r (g w) - x r^3 / D * sum_j (g w)_j x_j and dL/dw = sum_rows g (x r), for the output gradient g.
 * The weight gradient is summed per thread, then the partial sums in thread order, into gw. Returns 0, or -1
 * when the per-thread sums cannot be allocated. */
int rms_norm_bwd(const float *x, const float *w, const float *rstd, const float *gy, float *gx, float *gw,
                 int64_t rows, int64_t dim) {
    int threads = omp_get_max_threads();
    float *partial = calloc((size_t)threads * (size_t)dim, sizeof(float));
    if (partial == NULL) return -1;
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        float *acc = partial + (size_t)omp_get_thread_num() * (size_t)dim;
#pragma omp single
        used = omp_get_num_threads();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float *xi = x + i * dim, *gi = gy + i * dim;
            float *gxi = gx + i * dim;
            float r = rstd[i];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < dim; j++) dot += gi[j] * w[j] * xi[j];
            float coef = dot * r * r * r / (float)dim;
#pragma omp simd
            for (int64_t j = 0; j < dim; j++) {
                gxi[j] = gi[j] * w[j] * r - xi[j] * coef;
                acc[j] += gi[j] * (xi[j] * r);
            }
        }
    }
    for (int64_t j = 0; j < dim; j++) {
        float total = 0.0f;
        for (int t = 0; t < used; t++) total += partial[(size_t)t * (size_t)dim + (size_t)j];
        gw[j] = total;
    }
    free(partial);
    return 0;
}

/* ---- RoPE, "rotate half" (Su et al. 2021, §3.4.2) on bf16 heads with fp32 tables ------------------------
 * For the halves x1, x2 of each head (channels i and i + D/2):
 *   forward   y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
 *   backward  y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1   (the transpose: the gradient through the rotation)
 * x and y are (B, T, heads, D) in any layout whose channels are contiguous, given by element strides per
 * batch row, position and head; the tables cos, sin are (B or 1, T, D) contiguous, table_batch_stride 0
 * when shared by the batch. Each value is computed in fp32 and rounded to bf16 once. */
void rope(const uint16_t *x, int64_t xsb, int64_t xst, int64_t xsh, uint16_t *y, int64_t ysb, int64_t yst,
          int64_t ysh, const float *cos, const float *sin, int64_t table_batch_stride, int64_t batch, int64_t t_len,
          int64_t heads, int64_t dim, int backward) {
    int64_t half = dim / 2;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < t_len; t++) {
            const float *c = cos + b * table_batch_stride + t * dim, *s = sin + b * table_batch_stride + t * dim;
            for (int64_t h = 0; h < heads; h++) {
                const uint16_t *xi = x + b * xsb + t * xst + h * xsh;
                uint16_t *yi = y + b * ysb + t * yst + h * ysh;
                if (!backward) {
#pragma omp simd
                    for (int64_t i = 0; i < half; i++) {
                        float x1 = bf16_to_f32(xi[i]), x2 = bf16_to_f32(xi[i + half]);
                        yi[i] = f32_to_bf16(x1 * c[i] - x2 * s[i]);
                        yi[i + half] = f32_to_bf16(x2 * c[i + half] + x1 * s[i + half]);
                    }
                } else {
#pragma omp simd
                    for (int64_t i = 0; i < half; i++) {
                        float x1 = bf16_to_f32(xi[i]), x2 = bf16_to_f32(xi[i + half]);
                        yi[i] = f32_to_bf16(x1 * c[i] + x2 * s[i + half]);
                        yi[i + half] = f32_to_bf16(x2 * c[i + half] - x1 * s[i]);
                    }
                }
            }
        }
    }
}

/* ---- SwiGLU (Shazeer 2020, eq. 6): h = silu(g) u, elementwise over bf16 -------------------------------- */
void swiglu_fwd(const uint16_t *g, const uint16_t *u, uint16_t *h, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
#pragma omp simd
        for (int64_t i = start; i < end; i++) {
            float gi = bf16_to_f32(g[i]);
            h[i] = f32_to_bf16(gi * sigmoid_f32(gi) * bf16_to_f32(u[i]));
        }
    }
}

/* du = dh silu(g), dg = dh u s (1 + g (1 - s)) with s = sigmoid(g): silu's derivative. */
void swiglu_bwd(const uint16_t *g, const uint16_t *u, const uint16_t *dh, uint16_t *dg, uint16_t *du, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
#pragma omp simd
        for (int64_t i = start; i < end; i++) {
            float gi = bf16_to_f32(g[i]), ui = bf16_to_f32(u[i]), di = bf16_to_f32(dh[i]);
            float s = sigmoid_f32(gi);
            du[i] = f32_to_bf16(di * gi * s);
            dg[i] = f32_to_bf16(di * ui * s * (1.0f + gi * (1.0f - s)));
        }
    }
}

/* ---- GELU, tanh form (Hendrycks & Gimpel 2016, GPT-2's): y = x/2 (1 + tanh(k0 (x + k1 x^3))) ------------- */
#define GELU_K0 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_K1 0.044715f

/* With s = sigmoid(2 z), 1 + tanh(z) = 2 s and 1 - tanh(z)^2 = 4 s (1 - s): y = x s, and no cancellation
 * in 1 + tanh(z) for negative z. */
void gelu_tanh_fwd(const uint16_t *x, uint16_t *y, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
#pragma omp simd
        for (int64_t i = start; i < end; i++) {
            float v = bf16_to_f32(x[i]);
            y[i] = f32_to_bf16(v * sigmoid_f32(2.0f * GELU_K0 * (v + GELU_K1 * v * v * v)));
        }
    }
}

/* dy/dx = (1 + t) / 2 + x/2 (1 - t^2) k0 (1 + 3 k1 x^2) with t = tanh(k0 (x + k1 x^3)) (torch's
 * gelu_backward), = s + 2 x s (1 - s) k0 (1 + 3 k1 x^2). */
void gelu_tanh_bwd(const uint16_t *x, const uint16_t *dy, uint16_t *dx, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
#pragma omp simd
        for (int64_t i = start; i < end; i++) {
            float v = bf16_to_f32(x[i]);
            float s = sigmoid_f32(2.0f * GELU_K0 * (v + GELU_K1 * v * v * v));
            float slope = s + 2.0f * v * s * (1.0f - s) * GELU_K0 * (1.0f + 3.0f * GELU_K1 * v * v);
            dx[i] = f32_to_bf16(bf16_to_f32(dy[i]) * slope);
        }
    }
}

/* ---- Attention softmax over bf16 score rows -------------------------------------------------------------
 * p = bf16(softmax(scale * s)) per row of `cols` scores; rows come in blocks of `t_rows` queries (one
 * (T, S) matrix per batch row and head). causal: query i sees keys j <= i + cols - t_rows (its position
 * after the cached keys), the rest get probability 0. */
void attn_softmax_fwd(const uint16_t *s, uint16_t *p, int64_t rows, int64_t cols, int64_t t_rows, float scale,
                      int causal) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *si = s + i * cols;
        uint16_t *pi = p + i * cols;
        int64_t n = causal ? (i % t_rows) + cols - t_rows + 1 : cols;
        n = n < 1 ? 1 : (n > cols ? cols : n); /* callers pass t_rows <= cols when causal */
        float buf[n];
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; j++) {
            buf[j] = bf16_to_f32(si[j]) * scale;
            m = buf[j] > m ? buf[j] : m;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) {
            buf[j] = exp_f32(buf[j] - m);
            sum += buf[j];
        }
        float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) pi[j] = f32_to_bf16(buf[j] * inv);
        for (int64_t j = n; j < cols; j++) pi[j] = 0;
    }
}

/* ---- Cross-entropy over bf16 logit rows -----------------------------------------------------------------
 * Per row i of `vocab` logits x: lse_i = log sum_j exp(x_j) (fp32), picked_i = x_{y_i} - lse_i = log p_{y_i},
 * and, when sum_logp is given, sum_logp_i = sum_j log p_j (label smoothing's term). Returns 0, or -1 (and
 * computes nothing) when a label lies outside [0, vocab). */
int cross_entropy_fwd(const uint16_t *logits, const int64_t *labels, float *lse, float *picked, float *sum_logp,
                      int64_t rows, int64_t vocab) {
    for (int64_t i = 0; i < rows; i++)
        if (labels[i] < 0 || labels[i] >= vocab) return -1; /* would index outside the row */
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xi = logits + i * vocab;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < vocab; j++) {
            float v = bf16_to_f32(xi[j]);
            m = v > m ? v : m;
        }
        float sum = 0.0f, total = 0.0f;
#pragma omp simd reduction(+ : sum, total)
        for (int64_t j = 0; j < vocab; j++) {
            float v = bf16_to_f32(xi[j]);
            sum += exp_f32(v - m);
            total += v;
        }
        float l = m + logf(sum);
        lse[i] = l;
        picked[i] = bf16_to_f32(xi[labels[i]]) - l;
        if (sum_logp) sum_logp[i] = total - (float)vocab * l;
    }
    return 0;
}

/* grad_ij = bf16(coef_p_i p_ij + coef_all_i + [j == y_i] coef_label_i), p_ij = exp(x_ij - lse_i): the
 * gradient of any weighted mix of -log p_y and sum_j -log p_j, whose weights the caller folds into the
 * three per-row coefficients. Returns 0, or -1 (and computes nothing) when a label lies outside [0, vocab). */
int cross_entropy_bwd(const uint16_t *logits, const int64_t *labels, const float *lse, const float *coef_p,
                      const float *coef_all, const float *coef_label, uint16_t *grad, int64_t rows, int64_t vocab) {
    for (int64_t i = 0; i < rows; i++)
        if (labels[i] < 0 || labels[i] >= vocab) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xi = logits + i * vocab;
        uint16_t *gi = grad + i * vocab;
        float l = lse[i], cp = coef_p[i], ca = coef_all[i];
#pragma omp simd
        for (int64_t j = 0; j < vocab; j++) gi[j] = f32_to_bf16(cp * exp_f32(bf16_to_f32(xi[j]) - l) + ca);
        int64_t y = labels[i];
        gi[y] = f32_to_bf16(cp * exp_f32(bf16_to_f32(xi[y]) - l) + ca + coef_label[i]);
    }
    return 0;
}
