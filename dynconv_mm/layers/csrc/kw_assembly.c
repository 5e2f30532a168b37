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
 * Compiled on first use by dynconv_mm/layers/native.py (GCC or Clang vector extensions; OpenMP
 * when the compiler has it).
 */
#include <stdint.h>
#include <string.h>

#define DCMM_ABI_VERSION 1
#define CHUNK_ROWS 256
/* tiles ahead of the current one whose warehouse rows are prefetched */
#define PREFETCH_TILES 4

typedef float vec16 __attribute__((vector_size(64), aligned(4)));
typedef float vec8 __attribute__((vector_size(32), aligned(4)));

int dcmm_abi_version(void) { return DCMM_ABI_VERSION; }

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

#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for num_threads(threads) schedule(static)")
#else
#define PARALLEL_FOR
#endif

/* one case per accumulator shape: NVEC vectors of L columns, R rows per tile (R * NVEC <= 8) */
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
    CASE(2, tiles_w16, 2, 4)
    CASE(3, tiles_w16, 3, 2)
    CASE(4, tiles_w16, 4, 2)
    CASE(5, tiles_w16, 5, 1)
    CASE(6, tiles_w16, 6, 1)
    CASE(7, tiles_w16, 7, 1)
    CASE(8, tiles_w16, 8, 1)
    default:
      return -1;
  }
  return 0;
}
