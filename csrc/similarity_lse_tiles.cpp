// Tile kernels of similarity_lse (see similarity_lse_tiles.h), one copy per instruction set.
//
// Built with -fno-trapping-math (setup.py; PyTorch builds its own kernels the same way):
// under the default -ftrapping-math gcc 12 will not turn the clamps and selects of the exp
// loops into vector blends, and leaves those loops scalar ("control flow in loop") on every
// target but AVX-512, whose masked instructions hide them. tests/test_cpu_similarity_lse.py
// reads the built extension's disassembly so a scalar variant cannot come back unnoticed.
#include "similarity_lse_tiles.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace xfast {
namespace {

// exp(x) for x <= 0: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and
// exp(r) ~ 1 + r + r^2 q(r) with q of degree 4 fitted to (exp(r) - 1 - r) / r^2 for the
// least relative error (3.8e-9 with these float32 coefficients), evaluated in Estrin's
// order (4 dependent steps instead of Horner's 7: the tile kernels ran 9-10% faster than with the
// former degree-7 Horner polynomial). Error bound: 3.8e-9 (polynomial) + ~1e-8 (reduction)
// + 3 roundings of 2^-24 in the evaluation < 2^-22 relative; measured over every float in
// [-87, 0]: 1.19e-7 (tests/test_cpu_similarity_lse.py checks 2^-22 on every variant).
// 2^n is built in the exponent bits; x < -87 (also -inf) gives exactly 0 (the callers'
// margins, kMargin, make that flush harmless), through an integer mask so the body is
// branch-free.
#pragma omp declare simd notinbranch
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  const float r2 = r * r;
  const float q = (4.999998808e-01f + 1.666651815e-01f * r) +
                  r2 * ((4.166950658e-02f + 8.368914947e-03f * r) + r2 * 1.375296968e-03f);
  const float p = (1.0f + r) + r2 * q;
  const int32_t keep = -static_cast<int32_t>(x >= -87.0f);  // all ones, or 0 to flush
  const int32_t bits = ((static_cast<int32_t>(n) + 127) << 23) & keep;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// float64 is the tests' precision, not a fast path: plain libm.
inline double exp_nonpos(double x) { return std::exp(x); }

// One exp per element serves rows and columns when every row and column max of a tile lies
// within kMargin of the tile's max: the terms that matter (within ~30 of their row/column
// max in float32, smaller ones are below rounding) then stay normal numbers after
// exp(z - ref). Otherwise the tile takes the exact two-exp path.
template <typename T> struct Limits;
template <> struct Limits<float> { static constexpr float kMargin = 50.0f; };    // 50 + 30 < 87
template <> struct Limits<double> { static constexpr double kMargin = 600.0; };  // 600 + 40 < 708

template <typename T>
inline void forward_tile(T* z, int64_t rows, int64_t cols, T diag_bias, int64_t diag_col0, T* row_m, T* row_l,
                         T* col_m, T* col_l, T* scratch) {
  const bool with_cols = col_m != nullptr;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T* col_max = scratch;
  T* col_sum = scratch + cols;
  T* row_max = scratch + 2 * cols;
  std::fill(col_max, col_max + cols, neg_inf);
  std::fill(col_sum, col_sum + cols, T(0));
  T ref = neg_inf, lowest = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* zr = z + r * cols;
    const int64_t dc = diag_col0 + r;
    const bool biased = diag_bias != T(0) && dc >= 0 && dc < cols;
    const T col_max_before = biased && with_cols ? col_max[dc] : T(0);
    T m = neg_inf;
    // Row and column maxima in one read of the row; the biased element is redone below.
    // Reductions take a copy v of the element: written m = std::max(m, zr[c]), the loop stayed
    // scalar under gcc 12, because std::max returns a reference to one of its arguments (the
    // reduction variable or the array element) and the loop then loads through a selected
    // address (-fopt-info-vec: "no vectype for stmt"). The column max is a ternary for the same
    // reason: with col_max[c] = std::max(col_max[c], v) this loop stayed scalar too (gcc 12,
    // standalone copy, same message; a loop with only the column max vectorises either way).
    // The disassembly test counts the packed maxima.
    if (with_cols) {
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < cols; ++c) {
        const T v = zr[c];
        m = std::max(m, v);
        col_max[c] = col_max[c] > v ? col_max[c] : v;
      }
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < cols; ++c) {
        const T v = zr[c];
        m = std::max(m, v);
      }
    }
    if (biased) {
      // The row max may keep the unbiased value (an upper bound is a valid shift); the
      // column max is redone exactly from its value before this row.
      zr[dc] += diag_bias;
      m = std::max(m, zr[dc]);
      if (with_cols) col_max[dc] = std::max(col_max_before, zr[dc]);
    }
    row_max[r] = m;
    ref = std::max(ref, m);
    lowest = std::min(lowest, m);
  }
  if (with_cols) {
#pragma omp simd reduction(min : lowest)
    for (int64_t c = 0; c < cols; ++c) {
      const T v = col_max[c];  // a copy, as for the row max above (std::min(lowest, col_max[c]) stayed scalar)
      lowest = std::min(lowest, v);
    }
  }
  const bool one_exp = ref - lowest <= Limits<T>::kMargin;

  for (int64_t r = 0; r < rows; ++r) {
    const T* zr = z + r * cols;
    const T shift = one_exp ? ref : row_max[r];
    T s = 0;
    if (one_exp && with_cols) {
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < cols; ++c) {
        const T e = exp_nonpos(zr[c] - shift);
        s += e;
        col_sum[c] += e;
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < cols; ++c) s += exp_nonpos(zr[c] - shift);
      if (with_cols) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) col_sum[c] += exp_nonpos(zr[c] - col_max[c]);
      }
    }
    merge_lse(row_m[r], row_l[r], shift, s);
  }
  if (with_cols) {
    // Column merge, branch-free: col_sum > 0 (each column holds its max within kMargin of
    // the shift), and an empty accumulator (m = -inf, l = 0) contributes exp(-inf) * 0 = 0.
    if (one_exp) std::fill(col_max, col_max + cols, ref);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const T m_new = std::max(col_m[c], col_max[c]);
      col_l[c] = col_l[c] * exp_nonpos(col_m[c] - m_new) + col_sum[c] * exp_nonpos(col_max[c] - m_new);
      col_m[c] = m_new;
    }
  }
}

template <typename T>
inline T backward_tile(T* z, int64_t rows, int64_t cols, T diag_bias, int64_t diag_col0, const T* row_lse,
                       const T* col_lse, const T* g_row, const T* g_col, T* scratch) {
  T ref = -std::numeric_limits<T>::infinity();
  T lowest = std::numeric_limits<T>::infinity();
  if (g_row) for (int64_t r = 0; r < rows; ++r) { ref = std::max(ref, row_lse[r]); lowest = std::min(lowest, row_lse[r]); }
  if (g_col) for (int64_t c = 0; c < cols; ++c) { ref = std::max(ref, col_lse[c]); lowest = std::min(lowest, col_lse[c]); }
  // Z <= both logsumexps, so exp(Z - ref) <= 1, and exp(ref - lse) <= e^margin.
  const bool one_exp = g_row && g_col && ref - lowest <= Limits<T>::kMargin;
  T* col_weight = scratch;  // g_col * exp(ref - col_lse), as a quotient so it vectorises
  if (one_exp) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) col_weight[c] = g_col[c] / exp_nonpos(col_lse[c] - ref);
  }

  T dz = 0;  // sum(D * Z) without the bias
  for (int64_t r = 0; r < rows; ++r) {
    T* zr = z + r * cols;
    const int64_t dc = diag_col0 + r;
    const bool biased = diag_bias != T(0) && dc >= 0 && dc < cols;
    const T z_diag = biased ? zr[dc] : T(0);
    T acc = 0;
    if (one_exp) {
      const T row_weight = g_row[r] * std::exp(ref - row_lse[r]);
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < cols; ++c) {
        const T d = exp_nonpos(zr[c] - ref) * (row_weight + col_weight[c]);
        acc += d * zr[c];
        zr[c] = d;
      }
    } else if (g_row && g_col) {
      const T gr = g_row[r], lr = row_lse[r];
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < cols; ++c) {
        const T d = gr * exp_nonpos(zr[c] - lr) + g_col[c] * exp_nonpos(zr[c] - col_lse[c]);
        acc += d * zr[c];
        zr[c] = d;
      }
    } else if (g_row) {
      const T gr = g_row[r], lr = row_lse[r];
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < cols; ++c) {
        const T d = gr * exp_nonpos(zr[c] - lr);
        acc += d * zr[c];
        zr[c] = d;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < cols; ++c) {
        const T d = g_col[c] * exp_nonpos(zr[c] - col_lse[c]);
        acc += d * zr[c];
        zr[c] = d;
      }
    }
    // The loops above left out the bias; redo the one biased element exactly.
    if (biased) {
      const T z = z_diag + diag_bias;
      T v = 0;
      if (g_row) v += g_row[r] * std::exp(z - row_lse[r]);
      if (g_col) v += g_col[dc] * std::exp(z - col_lse[dc]);
      acc += (v - zr[dc]) * z_diag;
      zr[dc] = v;
    }
    dz += acc;
  }
  return dz;
}

// exp of n values <= 0 in place, the tile loops' exp on its own (tests check its error bound).
template <typename T>
inline void exp_values(T* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = exp_nonpos(v[i]);
}

// One set of entry points per instruction set. `flatten` inlines the templates above into
// each, so their loops are compiled (and vectorised) for that target; extern "C" names keep
// them easy to find in the built extension's disassembly.
#define XFAST_TILE_VARIANT(SUFFIX, ...)                                                                        \
  extern "C" __attribute__((__VA_ARGS__)) void xfast_forward_tile_f32_##SUFFIX(                          \
      float* z, int64_t rows, int64_t cols, float diag_bias, int64_t diag_col0, float* row_m, float* row_l,       \
      float* col_m, float* col_l, float* scratch) {                                                              \
    forward_tile<float>(z, rows, cols, diag_bias, diag_col0, row_m, row_l, col_m, col_l, scratch);              \
  }                                                                                                              \
  extern "C" __attribute__((__VA_ARGS__)) float xfast_backward_tile_f32_##SUFFIX(                        \
      float* z, int64_t rows, int64_t cols, float diag_bias, int64_t diag_col0, const float* row_lse,            \
      const float* col_lse, const float* g_row, const float* g_col, float* scratch) {                           \
    return backward_tile<float>(z, rows, cols, diag_bias, diag_col0, row_lse, col_lse, g_row, g_col, scratch);  \
  }                                                                                                              \
  extern "C" __attribute__((__VA_ARGS__)) void xfast_exp_f32_##SUFFIX(float* v, int64_t n) {              \
    exp_values<float>(v, n);                                                                                     \
  }                                                                                                              \
  const TileKernels<float> kTiles_##SUFFIX{xfast_forward_tile_f32_##SUFFIX, xfast_backward_tile_f32_##SUFFIX,     \
                                           xfast_exp_f32_##SUFFIX};

XFAST_TILE_VARIANT(baseline, flatten)
#if defined(__x86_64__) || defined(__i386__)
XFAST_TILE_VARIANT(avx2_fma, flatten, target("avx2,fma"))
XFAST_TILE_VARIANT(avx512, flatten, target("avx512f,avx2,fma"))
#endif
#undef XFAST_TILE_VARIANT

const TileKernels<double> kTilesDouble{forward_tile<double>, backward_tile<double>, exp_values<double>};

struct Variant {
  const char* name;
  const TileKernels<float>* kernels;
  bool (*supported)();
};

const Variant kVariants[] = {
#if defined(__x86_64__) || defined(__i386__)
    {"avx512", &kTiles_avx512, [] { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"); }},
    {"avx2_fma", &kTiles_avx2_fma, [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }},
#endif
    {"baseline", &kTiles_baseline, [] { return true; }},
};

const Variant* best_variant() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#endif
  for (const Variant& v : kVariants)
    if (v.supported()) return &v;
  return nullptr;  // unreachable: the baseline is always supported
}

std::atomic<const Variant*>& current_variant() {
  static std::atomic<const Variant*> current{best_variant()};
  return current;
}

}  // namespace

const char* tile_isa() { return current_variant().load()->name; }

std::vector<std::string> supported_tile_isas() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#endif
  std::vector<std::string> names;
  for (const Variant& v : kVariants)
    if (v.supported()) names.emplace_back(v.name);
  return names;
}

void select_tile_isa(const std::string& isa) {
  for (const Variant& v : kVariants) {
    if (isa == v.name) {
      if (!v.supported()) throw std::invalid_argument("this CPU cannot run the " + isa + " tile kernels");
      current_variant().store(&v);
      return;
    }
  }
  throw std::invalid_argument("unknown tile kernel variant '" + isa + "' (avx512, avx2_fma or baseline)");
}

template <>
const TileKernels<float>& tile_kernels<float>() {
  return *current_variant().load()->kernels;
}

template <>
const TileKernels<double>& tile_kernels<double>() {
  return kTilesDouble;
}

}  // namespace xfast
