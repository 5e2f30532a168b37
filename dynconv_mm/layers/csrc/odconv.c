/*
 * Inference of ODConv's attentions and per-sample kernels on the CPU, in one call:
 *
 *   ctx[b, c]  = mean_{h, w} x[b, c, h, w]
 *   hid[b, r]  = ReLU((sum_c fc[r, c] * ctx[b, c] - mean[r]) * gamma[r] / sqrt(var[r] + eps) + beta[r])
 *   a_c[b, c]  = sigmoid((channel_fc[c] . hid[b] + channel_b[c]) / T)        input channels
 *   a_f[b, o]  = sigmoid((filter_fc[o] . hid[b] + filter_b[o]) / T)          output channels (or 1)
 *   a_s[b, t]  = sigmoid((spatial_fc[t] . hid[b] + spatial_b[t]) / T)        kernel taps (or 1)
 *   a_k[b, :]  = softmax((kernel_fc . hid[b] + kernel_b) / T)                kernels (or 1)
 *   w[b, o, i, t] = a_f[b, o] * a_c[b, g(o) * cig + i] * a_s[b, t] * sum_n a_k[b, n] * weight[n, o, i, t]
 *
 * with cig = C_in / groups input channels per group and g(o) the group of output channel o. The
 * caller convolves x with w: the input and output scalings of the layer are folded into the
 * kernel, so the convolution is the only pass over the feature maps. PyTorch runs these as some
 * twenty operators whose fixed costs, and the pass of each scaling, add ~0.3 ms to a 1 ms layer at
 * batch 1.
 *
 * The kernels are written by output channel, one thread per range of output channels, reading the
 * n kernels' rows once for all samples. Every value is computed by one thread in a fixed order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* one attention head: out[j] = f((w[j] . h + b[j]) / T) for j < n; f: 0 identity, 1 sigmoid */
static void head(const float *w, const float *b, const float *h, int64_t hidden, int64_t n, float inv_t,
                 int sigmoid, float *out) {
  for (int64_t j = 0; j < n; j++) {
    const float z = (dot_f32(w + j * hidden, h, hidden) + (b ? b[j] : 0.0f)) * inv_t;
    out[j] = sigmoid ? 1.0f / (1.0f + expf(-z)) : z;
  }
}

/*
 * x (B, C_in, H, W) contiguous; fc (R, C_in); channel_fc (C_in, R); filter_fc (C_out, R), spatial_fc
 * (taps, R) and kernel_fc (n, R) may be NULL (absent heads), as may every bias and the batch norm's
 * affine parameters; weight (n, C_out, C_in / groups, taps); out (B, C_out, C_in / groups, taps).
 * Returns 0, -1 for invalid arguments, -2 when scratch memory cannot be allocated (nothing written).
 */
int dcmm_odconv_kernels_f32(const float *x, int64_t batch, int64_t c_in, int64_t hw, const float *fc,
                            int64_t hidden, const float *bn_mean, const float *bn_var, const float *bn_weight,
                            const float *bn_bias, double bn_eps, const float *channel_fc, const float *channel_b,
                            const float *filter_fc, const float *filter_b, const float *spatial_fc,
                            const float *spatial_b, const float *kernel_fc, const float *kernel_b,
                            double temperature, const float *weight, int64_t n, int64_t c_out, int64_t groups,
                            int64_t taps, float *out, int threads) {
  if (batch < 1 || c_in < 1 || hw < 1 || hidden < 1 || n < 1 || c_out < 1 || groups < 1 || taps < 1 ||
      c_in % groups || c_out % groups || !(temperature > 0) || threads < 1 || (n > 1 && kernel_fc == NULL))
    return -1;
  if (!HAS_OPENMP) threads = 1;
  const int64_t cig = c_in / groups, cog = c_out / groups, row = cig * taps;
  const float inv_t = (float)(1.0 / temperature);
  /* ctx, hid, bn scale and shift, then the four attentions per sample */
  const int64_t per_b = c_in + hidden + c_in + c_out + taps + n;
  float *buf = malloc(sizeof(float) * (size_t)(2 * hidden + batch * per_b));
  if (buf == NULL) return -2;
  float *scale = buf, *shift = buf + hidden, *att = buf + 2 * hidden;
#define CTX(b) (att + (b) * per_b)
#define HID(b) (CTX(b) + c_in)
#define A_C(b) (HID(b) + hidden)
#define A_F(b) (A_C(b) + c_in)
#define A_S(b) (A_F(b) + c_out)
#define A_K(b) (A_S(b) + taps)
  fold_batch_norm(bn_mean, bn_var, bn_weight, bn_bias, bn_eps, hidden, scale, shift);

  PARALLEL_REGION
  {
    FOR_CHUNKS
    for (int64_t i = 0; i < batch * c_in; i++) CTX(i / c_in)[i % c_in] = mean_f32(x + i * hw, hw);

    FOR_CHUNKS
    for (int64_t i = 0; i < batch * hidden; i++) {
      const int64_t b = i / hidden, r = i % hidden;
      HID(b)[r] = fc_bn_relu(fc + r * c_in, CTX(b), c_in, scale[r], shift[r]);
    }

    FOR_CHUNKS
    for (int64_t b = 0; b < batch; b++) {
      const float *h = HID(b);
      head(channel_fc, channel_b, h, hidden, c_in, inv_t, 1, A_C(b));
      if (filter_fc) head(filter_fc, filter_b, h, hidden, c_out, inv_t, 1, A_F(b));
      else for (int64_t o = 0; o < c_out; o++) A_F(b)[o] = 1.0f;
      if (spatial_fc) head(spatial_fc, spatial_b, h, hidden, taps, inv_t, 1, A_S(b));
      else for (int64_t t = 0; t < taps; t++) A_S(b)[t] = 1.0f;
      float *a_k = A_K(b);
      if (kernel_fc) {
        head(kernel_fc, kernel_b, h, hidden, n, inv_t, 0, a_k);
        float top = a_k[0], total = 0.0f;
        for (int64_t k = 1; k < n; k++) top = a_k[k] > top ? a_k[k] : top;
        for (int64_t k = 0; k < n; k++) total += (a_k[k] = expf(a_k[k] - top));
        for (int64_t k = 0; k < n; k++) a_k[k] /= total;
      } else {
        a_k[0] = 1.0f;
      }
    }

    /* one output channel's rows (cig x taps) of every kernel, for every sample */
    FOR_CHUNKS
    for (int64_t o = 0; o < c_out; o++) {
      const int64_t first_in = (o / cog) * cig;
      for (int64_t b = 0; b < batch; b++) {
        const float *a_k = A_K(b), *a_s = A_S(b), *a_c = A_C(b) + first_in;
        const float a_f = A_F(b)[o];
        float *dst = out + (b * c_out + o) * row;
        for (int64_t e = 0; e < row; e++) dst[e] = 0.0f;
        for (int64_t k = 0; k < n; k++) {
          const float *src = weight + (k * c_out + o) * row;
          const float a = a_k[k];
          for (int64_t e = 0; e < row; e++) dst[e] += a * src[e];
        }
        for (int64_t i = 0; i < cig; i++) {
          const float s = a_f * a_c[i];
          float *d = dst + i * taps;
          for (int64_t t = 0; t < taps; t++) d[t] *= s * a_s[t];
        }
      }
    }
  }
#undef CTX
#undef HID
#undef A_C
#undef A_F
#undef A_S
#undef A_K
  free(buf);
  return 0;
}
