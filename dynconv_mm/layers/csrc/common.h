/*
 * What the C sources of dynconv_mm's native CPU kernels share: OpenMP macros, the vector types
 * (GCC/Clang vector extensions, unaligned loads allowed), sums, and the pooled-context attention
 * branch's pieces (mean, folded eval-mode batch norm, ReLU).
 */
#ifndef DCMM_COMMON_H
#define DCMM_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* OpenMP when the compiler has it; without it the loops run on one thread */
#ifdef _OPENMP
#include <omp.h>
#define HAS_OPENMP 1
#define THREAD_ID omp_get_thread_num()
#define PARALLEL_FOR _Pragma("omp parallel for num_threads(threads) schedule(static)")
#define PARALLEL_REGION _Pragma("omp parallel num_threads(threads)")
#define FOR_CHUNKS _Pragma("omp for schedule(static)")
#else
#define HAS_OPENMP 0
#define THREAD_ID 0
#define PARALLEL_FOR
#define PARALLEL_REGION
#define FOR_CHUNKS
#endif

/* bumped whenever an exported function's arguments change (checked by native.py) */
#define DCMM_ABI_VERSION 2

typedef float vec16 __attribute__((vector_size(64), aligned(4)));
typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16), aligned(4)));

/* the sum of a vector's 16 lanes, as a tree (the same order on every call) */
static inline float hsum16(vec16 a) {
  vec8 lo, hi;
  memcpy(&lo, &a, sizeof(lo));
  memcpy(&hi, (const char *)&a + sizeof(lo), sizeof(hi));
  lo += hi;
  vec4 l4, h4;
  memcpy(&l4, &lo, sizeof(l4));
  memcpy(&h4, (const char *)&lo + sizeof(l4), sizeof(h4));
  l4 += h4;
  return (l4[0] + l4[2]) + (l4[1] + l4[3]);
}

/* sum_i a[i] * b[i]: 16 partial sums and a tree, then the tail */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
  const int64_t n16 = n / 16 * 16;
  vec16 acc = {0};
  for (int64_t i = 0; i < n16; i += 16) acc += *(const vec16 *)(a + i) * *(const vec16 *)(b + i);
  float s = hsum16(acc);
  for (int64_t i = n16; i < n; i++) s += a[i] * b[i];
  return s;
}

/* the mean of n floats: 16 partial sums and a tree, then the tail */
static inline float mean_f32(const float *p, int64_t n) {
  const int64_t n16 = n / 16 * 16;
  vec16 acc = {0};
  for (int64_t i = 0; i < n16; i += 16) acc += *(const vec16 *)(p + i);
  float s = hsum16(acc);
  for (int64_t i = n16; i < n; i++) s += p[i];
  return s / (float)n;
}

/* eval-mode batch norm of n channels as y = x * scale + shift (weight and bias may be NULL) */
static inline void fold_batch_norm(const float *mean, const float *var, const float *weight, const float *bias,
                                   double eps, int64_t n, float *scale, float *shift) {
  for (int64_t r = 0; r < n; r++) {
    const float inv = 1.0f / sqrtf(var[r] + (float)eps);
    scale[r] = weight ? inv * weight[r] : inv;
    shift[r] = (bias ? bias[r] : 0.0f) - mean[r] * scale[r];
  }
}

/* ReLU(BN(w . x)) of one hidden unit of an attention branch, with the norm folded */
static inline float fc_bn_relu(const float *w, const float *x, int64_t n, float scale, float shift) {
  const float y = dot_f32(w, x, n) * scale + shift;
  return y > 0.0f ? y : 0.0f;
}

#endif
