/*
 * Inference forward of the dynamic depth-wise convolution (DWNet's D-DW-Conv, DynamicDWConv2d) on
 * the CPU, in one call:
 *
 *   ctx[b, c]  = mean_{h, w} x[b, c, h, w]
 *   hid[b, r]  = ReLU((sum_c w1[r, c] * ctx[b, c] - mean[r]) * gamma[r] / sqrt(var[r] + eps) + beta[r])
 *   k[b, c, t] = b2[c * KK + t] + sum_r w2[c * KK + t, r] * hid[b, r]          t < KK = kh * kw
 *   y[b, c]    = depth-wise convolution of x[b, c] with k[b, c] (stride 1, zero padding, dilation)
 *                + bias[c]
 *
 * i.e. adaptive average pooling, the generator's 1x1 convolution, eval-mode batch norm and ReLU,
 * the second 1x1 convolution (the only large weight: C * KK * R floats) and the per-sample
 * convolution. PyTorch runs these as eight operators whose fixed costs dominate at batch 1.
 *
 * Each thread takes channels: for every sample it generates the channel's kernel (the channel's
 * KK rows of w2 stay in cache across the batch), copies the channel's plane into a zero-padded
 * buffer whose rows are wp = W + 2 * pw apart, and convolves it:
 *
 * - 3x3, 5x5 and 7x7 kernel heights without vertical dilation (the depth-wise convolutions in use):
 *   blocks of 4 output rows x 16 columns in registers; each input vector is loaded once per tap
 *   column and serves every output row of the block it reaches;
 * - other kernels: output (i, j) is the flat index t = i * wp + j and tap (u, v) reads
 *   t + u * dh * wp + v * dw, one contiguous multiply-add per tap over 64 outputs at a time (the
 *   wp - Wo padding columns of each row are computed and dropped).
 *
 * Every output is computed by one thread in a fixed order: results do not depend on the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* kernels of up to this many taps (32 x 32) */
#define DDW_MAX_TAPS 1024

/*
 * Generic taps: acc[t] = sum_{u, v} k[u * kw + v] * xp[t + u * row + v * dw] for t < n (a multiple of
 * 16), on the flat index t = i * wp + j (the wp - wo padding columns of each row are computed too).
 */
static void plane_conv_flat(const float *xp, int64_t n, const float *k, int kh, int kw, int64_t row, int dw,
                            float *acc) {
  int64_t t0 = 0;
  for (; t0 + 64 <= n; t0 += 64) {
    vec16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int u = 0; u < kh; u++) {
      const float *src_u = xp + t0 + u * row;
      const float *k_u = k + u * kw;
      for (int v = 0; v < kw; v++) {
        const float s = k_u[v];
        const vec16 *src = (const vec16 *)(src_u + (int64_t)v * dw);
        a0 += s * src[0];
        a1 += s * src[1];
        a2 += s * src[2];
        a3 += s * src[3];
      }
    }
    vec16 *dst = (vec16 *)(acc + t0);
    dst[0] = a0;
    dst[1] = a1;
    dst[2] = a2;
    dst[3] = a3;
  }
  for (; t0 < n; t0 += 16) {
    vec16 a0 = {0};
    for (int u = 0; u < kh; u++) {
      const float *src_u = xp + t0 + u * row;
      for (int v = 0; v < kw; v++) a0 += k[u * kw + v] * *(const vec16 *)(src_u + (int64_t)v * dw);
    }
    *(vec16 *)(acc + t0) = a0;
  }
}

static inline void store_row(float *dst, vec16 a, int64_t n) {
  if (n >= 16) {
    *(vec16 *)dst = a;
  } else {
    float tmp[16];
    memcpy(tmp, &a, sizeof(tmp));
    memcpy(dst, tmp, sizeof(float) * (size_t)n);
  }
}

/*
 * KH x kw taps, no vertical dilation: blocks of BLOCK_ROWS output rows x 16 columns. Input row q of a
 * block serves output row r through tap row u = q - r, so each input vector is loaded once per tap
 * column v and multiplied into up to KH accumulators (with the tap column's KH weights in registers).
 * Blocks may run past the last output row and column: the padded plane has BLOCK_ROWS - 1 spare zero
 * rows and 16 spare floats, and only real outputs are stored.
 */
#define BLOCK_ROWS 4
/* one load per input vector: without this GCC folds the load into each multiply-add again (a 16-float
 * vector fits one register only with AVX-512; elsewhere GCC splits it and the hint cannot apply) */
#if defined(__GNUC__) && defined(__AVX512F__)
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif
#define DEFINE_PLANE_CONV_ROWS(KH)                                                                   \
/* not inlined: in the caller's larger body GCC keeps fewer accumulators in registers */            \
static __attribute__((noinline)) void plane_conv_rows_##KH(                                        \
    const float *xp, int64_t wp, const float *k, int kw, int dw, int64_t ho, int64_t wo, float bias, \
    float *out) {                                                                                  \
  for (int64_t i0 = 0; i0 < ho; i0 += BLOCK_ROWS) {                                                \
    const int64_t rows = ho - i0 < BLOCK_ROWS ? ho - i0 : BLOCK_ROWS;                              \
    for (int64_t c0 = 0; c0 < wo; c0 += 16) {                                                      \
      vec16 acc[BLOCK_ROWS];                                                                       \
      for (int r = 0; r < BLOCK_ROWS; r++) acc[r] = (vec16){0} + bias;                             \
      const float *base = xp + i0 * wp + c0;                                                       \
      for (int v = 0; v < kw; v++) {                                                               \
        float kv[KH];                                                                              \
        for (int u = 0; u < KH; u++) kv[u] = k[u * kw + v];                                        \
        const float *col = base + (int64_t)v * dw;                                                 \
        for (int q = 0; q < BLOCK_ROWS + KH - 1; q++) {                                            \
          vec16 s = *(const vec16 *)(col + q * wp);                                                \
          KEEP_IN_REGISTER(s);                                                                     \
          for (int r = 0; r < BLOCK_ROWS; r++)                                                     \
            if (q - r >= 0 && q - r < KH) acc[r] += kv[q - r] * s;                                 \
        }                                                                                          \
      }                                                                                            \
      for (int64_t r = 0; r < rows; r++) store_row(out + (i0 + r) * wo + c0, acc[r], wo - c0);     \
    }                                                                                              \
  }                                                                                                \
}

DEFINE_PLANE_CONV_ROWS(3)
DEFINE_PLANE_CONV_ROWS(5)
DEFINE_PLANE_CONV_ROWS(7)

/*
 * x (B, C, H, W) and out (B, C, Ho, Wo) contiguous, Ho = H + 2 ph - dh (kh - 1), likewise Wo;
 * w1 (R, C); w2 (C * kh * kw, R); bn_weight, bn_bias, b2 and bias may be NULL (ones / zeros).
 * Returns 0, -1 for invalid arguments, -2 when scratch memory cannot be allocated (nothing written).
 */
int dcmm_ddw_forward_f32(const float *x, int64_t batch, int64_t channels, int64_t height, int64_t width,
                         const float *w1, int64_t hidden, const float *bn_mean, const float *bn_var,
                         const float *bn_weight, const float *bn_bias, double bn_eps, const float *w2,
                         const float *b2, const float *bias, int kh, int kw, int ph, int pw, int dh, int dw,
                         float *out, int threads) {
  if (batch < 1 || channels < 1 || height < 1 || width < 1 || hidden < 1 || kh < 1 || kw < 1 ||
      (int64_t)kh * kw > DDW_MAX_TAPS || ph < 0 || pw < 0 || dh < 1 || dw < 1 || threads < 1)
    return -1;
  const int64_t hp = height + 2 * (int64_t)ph, wp = width + 2 * (int64_t)pw;
  const int64_t ho = hp - (int64_t)dh * (kh - 1), wo = wp - (int64_t)dw * (kw - 1);
  if (ho < 1 || wo < 1) return -1;
  const int64_t taps = (int64_t)kh * kw, hw = height * width;
  const int rows_path = dh == 1 && (kh == 3 || kh == 5 || kh == 7);
  /* flat path: outputs in whole vectors, reads below n_in; row-block path: spare rows and floats */
  const int64_t n_out = rows_path ? 0 : (ho * wp + 15) / 16 * 16;
  const int64_t row = (int64_t)dh * wp;
  const int64_t n_in = rows_path ? (hp + BLOCK_ROWS - 1) * wp + 16 : n_out + (kh - 1) * row + (int64_t)(kw - 1) * dw;
  const int64_t per_thread = (n_in + 15) / 16 * 16 + n_out;    /* padded plane + accumulators */
  if (!HAS_OPENMP) threads = 1;

  float *ctx = malloc(sizeof(float) * (size_t)(batch * channels + batch * hidden + hidden * 2));
  float *scratch = malloc(sizeof(float) * (size_t)(per_thread * threads));
  if (ctx == NULL || scratch == NULL) {
    free(ctx);
    free(scratch);
    return -2;
  }
  float *hid = ctx + batch * channels, *scale = hid + batch * hidden, *shift = scale + hidden;
  fold_batch_norm(bn_mean, bn_var, bn_weight, bn_bias, bn_eps, hidden, scale, shift);

  PARALLEL_REGION
  {
    float *xp = scratch + per_thread * THREAD_ID;
    float *acc = xp + (n_in + 15) / 16 * 16;
    float k[DDW_MAX_TAPS];
    memset(xp, 0, sizeof(float) * (size_t)n_in);

    FOR_CHUNKS
    for (int64_t i = 0; i < batch * channels; i++) ctx[i] = mean_f32(x + i * hw, hw);

    FOR_CHUNKS
    for (int64_t i = 0; i < batch * hidden; i++) {
      const int64_t b = i / hidden, r = i % hidden;
      hid[i] = fc_bn_relu(w1 + r * channels, ctx + b * channels, channels, scale[r], shift[r]);
    }

    FOR_CHUNKS
    for (int64_t c = 0; c < channels; c++) {
      const float *w2_c = w2 + c * taps * hidden;
      const float bias_c = bias ? bias[c] : 0.0f;
      for (int64_t b = 0; b < batch; b++) {
        const float *h = hid + b * hidden;
        for (int64_t t = 0; t < taps; t++)
          k[t] = dot_f32(w2_c + t * hidden, h, hidden) + (b2 ? b2[c * taps + t] : 0.0f);
        const float *src = x + (b * channels + c) * hw;
        for (int64_t i = 0; i < height; i++)
          memcpy(xp + (i + ph) * wp + pw, src + i * width, sizeof(float) * (size_t)width);
        float *o = out + (b * channels + c) * ho * wo;
        if (rows_path) {
          if (kh == 3) plane_conv_rows_3(xp, wp, k, kw, dw, ho, wo, bias_c, o);
          else if (kh == 5) plane_conv_rows_5(xp, wp, k, kw, dw, ho, wo, bias_c, o);
          else plane_conv_rows_7(xp, wp, k, kw, dw, ho, wo, bias_c, o);
        } else {
          plane_conv_flat(xp, n_out, k, kh, kw, row, dw, acc);
          for (int64_t i = 0; i < ho; i++)
            for (int64_t j = 0; j < wo; j++) o[i * wo + j] = acc[i * wp + j] + bias_c;
        }
      }
    }
  }
  free(ctx);
  free(scratch);
  return 0;
}
