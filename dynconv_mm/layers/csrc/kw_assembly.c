/*
 * KernelWarehouse kernel assembly on the CPU: a tall-skinny product written straight into the
 * per-sample kernel layout.
 *
 *   kernel[off(e, c)] = sum_j wt[e, j] * a[j, c]      e < rows, c < cols
 *
 * wt (rows, n) is a cell-major warehouse (row e holds kernel entry e of every cell, contiguous),
 * a (n, width) the attention, transposed and zero-padded to a width of 8 or 16 * vec columns.
 * Output addresses: off(e, c) = p * s_p + ci * s_ci + kk + col_off[c] with
 * e = (p * c_in + ci) * k + kk, i.e. the kernel entry within a cell is (output channel p,
 * input channel ci, spatial offset kk) and column c (sample, cell group) adds col_off[c].
 *
 * Each thread takes chunks of rows; a tile of R rows keeps R x width accumulators in registers and
 * reads its R warehouse rows once, so the warehouse is streamed from memory once at any column count
 * (MKL's sgemm on these shapes, 4-72 columns, reads it far below the memory bandwidth). Each output
 * entry is one sequential sum over j, like a plain dot product.
 *
 * Compiled on first use by dynconv_mm/layers/native.py with the other sources of csrc/ into one
 * library (GCC or Clang vector extensions; OpenMP when the compiler has it).
 */
#include <stdint.h>
#include <string.h>

#include "common.h"

#define CHUNK_ROWS 256
/* tiles ahead of the current one whose warehouse rows are prefetched */
#define PREFETCH_TILES 4

#define DEFINE_TILE_LOOP(NAME, VT, L)                                                                \
static inline __attribute__((always_inline)) void NAME(                                            \
    const float *wt, int64_t n, const float *a, int64_t cols, float *out, const int64_t *col_off,  \
    int64_t e0, int64_t e1, int64_t per_p, int64_t k, int64_t s_p, int64_t s_ci,                   \
    const int nvec, const int R) {                                                                 \
  float tile[8 * 8 * L] __attribute__((aligned(64)));                                              \
  const int64_t c_in = per_p / k;                                                                  \
  int64_t p = e0 / per_p, ci = (e0 % per_p) / k, kk = e0 % k;                                      \
  for (int64_t e = e0; e < e1; e += R) {                                                           \
    const int rr = (e1 - e) < R ? (int)(e1 - e) : R;                                               \
    VT acc[8][8];                                                                                  \
    for (int r = 0; r < R; r++)                                                                    \
      for (int v = 0; v < nvec; v++) acc[r][v] = (VT){0};                                          \
    const float *w = wt + e * n;                                                                   \
    if (rr == R) {                                                                                 \
      for (int64_t j = 0; j < n; j++) {                                                            \
        const VT *aj = (const VT *)(a + j * nvec * L);                                             \
        __builtin_prefetch(w + PREFETCH_TILES * R * n + j * R, 0, 0);                              \
        for (int r = 0; r < R; r++) {                                                              \
          const float s = w[r * n + j];                                                            \
          for (int v = 0; v < nvec; v++) acc[r][v] += s * aj[v];                                   \
        }                                                                                          \
      }                                                                                            \
    } else {                                                                                       \
      for (int64_t j = 0; j < n; j++) {                                                            \
        const VT *aj = (const VT *)(a + j * nvec * L);                                             \
        for (int r = 0; r < rr; r++) {                                                             \
          const float s = w[r * n + j];                                                            \
          for (int v = 0; v < nvec; v++) acc[r][v] += s * aj[v];                                   \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    for (int r = 0; r < rr; r++) {                                                                 \
      for (int v = 0; v < nvec; v++) memcpy(tile + (r * nvec + v) * L, &acc[r][v], sizeof(VT));    \
      float *o = out + p * s_p + ci * s_ci + kk;                                                   \
      const float *t = tile + r * nvec * L;                                                        \
      for (int64_t c = 0; c < cols; c++) o[col_off[c]] = t[c];                                     \
      if (++kk == k) {                                                                             \
        kk = 0;                                                                                    \
        if (++ci == c_in) { ci = 0; ++p; }                                                         \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
}

DEFINE_TILE_LOOP(tiles_w8, vec8, 8)
DEFINE_TILE_LOOP(tiles_w16, vec16, 16)

/* one case per accumulator shape: NVEC vectors of L columns, R rows per tile (R * NVEC <= 28 registers) */
#define CASE(CODE, FN, NVEC, R)                                                                    \
  case CODE:                                                                                       \
    PARALLEL_FOR                                                                                   \
    for (int64_t b = 0; b < chunks; b++) {                                                         \
      const int64_t e0 = b * CHUNK_ROWS, e1 = e0 + CHUNK_ROWS < rows ? e0 + CHUNK_ROWS : rows;     \
      FN(wt, n, a, cols, out, col_off, e0, e1, per_p, k, s_p, s_ci, NVEC, R);                      \
    }                                                                                              \
    break;

/*
 * width: 0 for one vector of 8 columns (cols <= 8), 1-8 for that many vectors of 16 columns.
 * Returns 0, or -1 for an unsupported width or shape.
 */
int dcmm_kw_assemble_f32(const float *wt, int64_t rows, int64_t n, const float *a, int64_t cols, int width,
                         float *out, const int64_t *col_off, int64_t per_p, int64_t k, int64_t s_p,
                         int64_t s_ci, int threads) {
  if (rows < 0 || n < 1 || cols < 1 || k < 1 || per_p < k || per_p % k != 0 || threads < 1) return -1;
  if (cols > (width == 0 ? 8 : 16 * width)) return -1;
  const int64_t chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
  (void)threads;
  switch (width) {
    CASE(0, tiles_w8, 1, 8)
    CASE(1, tiles_w16, 1, 8)
    CASE(2, tiles_w16, 2, 6)
    CASE(3, tiles_w16, 3, 4)
    CASE(4, tiles_w16, 4, 4)
    CASE(5, tiles_w16, 5, 4)
    CASE(6, tiles_w16, 6, 4)
    CASE(7, tiles_w16, 7, 4)
    CASE(8, tiles_w16, 8, 3)
    default:
      return -1;
  }
  return 0;
}

/*
 * Backward pass of the assembly, both gradients in one sweep over the rows:
 *
 *   grad_w[e, j] (+)= sum_c g[off(e, c)] * a[c, j]          (warehouse gradient, (rows, n))
 *   grad_a[c, j]    = sum_e g[off(e, c)] * wt[e, j]         (attention gradient, (cols, n))
 *
 * g is the kernel gradient in the kernel layout (same offsets as the forward), read in place: no
 * permuted copy. Vectors run over the n cells: a is (cols, 16 * nvec) zero-padded, grad_w rows are
 * written for j < n only. grad_a is accumulated per thread into partial[thread] (threads x cols x
 * 16 * nvec floats, zeroed by the caller), which the caller sums. Either output may be NULL.
 */
#define BWD_MAX_ROWS 4
#define BWD_MAX_VECS 18
static inline __attribute__((always_inline)) void backward_tiles(
    const float *wt, int64_t n, const float *a, int64_t cols, const float *g, const int64_t *col_off,
    int64_t e0, int64_t e1, int64_t per_p, int64_t k, int64_t s_p, int64_t s_ci, float *grad_w, int accumulate,
    float *part, const int64_t nvec, const int VB, const int R) {
  const int64_t c_in = per_p / k;
  const int64_t L = 16 * nvec;
  int64_t p = e0 / per_p, ci = (e0 % per_p) / k, kk = e0 % k;
  float wbuf[BWD_MAX_ROWS * 16 * BWD_MAX_VECS] __attribute__((aligned(64)));
  for (int64_t e = e0; e < e1; e += R) {
    const int rr = (e1 - e) < R ? (int)(e1 - e) : R;
    int64_t roff[BWD_MAX_ROWS];
    for (int r = 0; r < R; r++) {
      roff[r] = p * s_p + ci * s_ci + kk;
      if (r < rr && ++kk == k) {
        kk = 0;
        if (++ci == c_in) { ci = 0; ++p; }
      }
    }
    /* the tile's warehouse rows, zero-padded to whole vectors (rows beyond rr are zero) */
    memset(wbuf, 0, sizeof(float) * R * L);
    for (int r = 0; r < rr; r++) memcpy(wbuf + r * L, wt + (e + r) * n, sizeof(float) * n);
    /* the cells in blocks of VB vectors: R x VB accumulators for each gradient stay in registers */
    for (int64_t v0 = 0; v0 < nvec; v0 += VB) {
      vec16 wv[BWD_MAX_ROWS][4], accw[BWD_MAX_ROWS][4];
      for (int r = 0; r < R; r++)
        for (int v = 0; v < VB; v++) {
          memcpy(&wv[r][v], wbuf + r * L + (v0 + v) * 16, 64);
          accw[r][v] = (vec16){0};
        }
      for (int64_t c = 0; c < cols; c++) {
        const vec16 *ac = (const vec16 *)(a + c * L + v0 * 16);
        float gs[BWD_MAX_ROWS];
        for (int r = 0; r < R; r++) gs[r] = r < rr ? g[roff[r] + col_off[c]] : 0.0f;
        if (grad_w)
          for (int r = 0; r < R; r++)
            for (int v = 0; v < VB; v++) accw[r][v] += gs[r] * ac[v];
        if (part) {
          vec16 *pc = (vec16 *)(part + c * L + v0 * 16);
          for (int v = 0; v < VB; v++) {
            vec16 t = pc[v];
            for (int r = 0; r < R; r++) t += gs[r] * wv[r][v];
            pc[v] = t;
          }
        }
      }
      if (grad_w) {
        const int64_t j0 = v0 * 16, j1 = (v0 + VB) * 16 < n ? (v0 + VB) * 16 : n;
        for (int r = 0; r < rr; r++) {
          const float *t = (const float *)accw[r]; /* the VB vectors of row r, contiguous */
          float *o = grad_w + (e + r) * n + j0;
          if (accumulate)
            for (int64_t j = 0; j < j1 - j0; j++) o[j] += t[j];
          else
            memcpy(o, t, sizeof(float) * (j1 - j0));
        }
      }
    }
  }
}

#define BWD_CASE(CODE, VB, R)                                                                     \
  case CODE:                                                                                       \
    PARALLEL_REGION {                                                                              \
      float *part = partial ? partial + (int64_t)THREAD_ID * cols * 16 * nvec : NULL;              \
      FOR_CHUNKS                                                                                   \
      for (int64_t b = 0; b < chunks; b++) {                                                       \
        const int64_t e0 = b * CHUNK_ROWS, e1 = e0 + CHUNK_ROWS < rows ? e0 + CHUNK_ROWS : rows;   \
        backward_tiles(wt, n, a, cols, g, col_off, e0, e1, per_p, k, s_p, s_ci, grad_w, accumulate, \
                       part, nvec, VB, R);                                                         \
      }                                                                                            \
    }                                                                                              \
    break;

/*
 * nvec: vectors of 16 cells (n <= 16 * nvec <= 288); block: vectors per register block, 1-3, with
 * nvec a multiple of it (4 rows per tile). Returns 0, or -1 for an unsupported shape.
 */
int dcmm_kw_assemble_backward_f32(const float *wt, int64_t rows, int64_t n, const float *a, int64_t cols,
                                  int nvec, int block, const float *g, const int64_t *col_off, int64_t per_p,
                                  int64_t k, int64_t s_p, int64_t s_ci, float *grad_w, int accumulate,
                                  float *partial, int threads) {
  if (rows < 0 || n < 1 || cols < 1 || k < 1 || per_p < k || per_p % k != 0 || threads < 1) return -1;
  if (nvec < 1 || nvec > BWD_MAX_VECS || n > 16 * nvec || block < 1 || block > 3 || nvec % block) return -1;
  const int64_t chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
  (void)threads;
  switch (block) {
    BWD_CASE(1, 1, 4) BWD_CASE(2, 2, 4) BWD_CASE(3, 3, 4)
    default:
      return -1;
  }
  return 0;
}
