// Row and column logsumexp of Z = scale * X Y^T + B, tile by tile, on CPU.
//
// B is zero except B[i, offset + i] = diag_bias (SimCSE's hard-negative log-weight).
// Every contrastive loss in xfast is this op plus O(N*d) terms: the forward is one pass of
// GEMM tiles (X_blk @ Y_tile^T) with online logsumexp for rows and columns, the backward
// recomputes each tile from the saved logsumexps and feeds it to two GEMMs (dX, dY), so the
// whole loss costs four N x M x d GEMMs and nothing of size N x M is ever stored.
//
// Threads: row blocks are split into G = num_threads contiguous groups (at::parallel_for,
// OpenMP). A group owns its rows outright and keeps its own column accumulators (forward)
// or dY accumulator (backward); groups are merged in a fixed order, so results are
// bitwise reproducible for a given thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp(x) for x <= 0, written so gcc vectorises it inside `omp simd` loops: Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, degree-7 polynomial (< 1 ulp of float), 2^n built
// from the exponent bits. Results below the smallest normal float flush to zero, which the
// callers' margins (see kMargin) make harmless.
#pragma omp declare simd notinbranch
static inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x <= -87.0f ? 0.0f : p * scale;
}

#pragma omp declare simd notinbranch
static inline double exp_nonpos(double x) { return std::exp(x); }

// One exp per element is enough when every row and column max of a tile lies within kMargin
// of the tile's reference value: the terms that matter (within kWindow of their row/column
// max, smaller ones are below rounding) then stay normal numbers after exp(z - ref).
// Otherwise the tile takes the exact two-exp path.
template <typename T> struct Limits;
template <> struct Limits<float> { static constexpr float kMargin = 50.0f; };   // 50 + 30 < 87
template <> struct Limits<double> { static constexpr double kMargin = 600.0; }; // 600 + 40 < 708

template <typename T>
inline void merge_lse(T& m, T& l, T m_new, T l_new) {
  // (m, l) represents m + log(l); l == 0 means an empty sum.
  if (l_new == T(0)) return;
  if (l == T(0)) { m = m_new; l = l_new; return; }
  if (m_new > m) { l = l * std::exp(m - m_new) + l_new; m = m_new; }
  else { l = l + l_new * std::exp(m_new - m); }
}

// Forward work on one tile S (rows x cols, contiguous, raw dot products). Turns S into
// Z in place and folds the tile into the running row (row_m, row_l) and column
// (col_m, col_l) logsumexp accumulators. col_m == nullptr skips the columns.
template <typename T>
#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void forward_tile(T* S, int64_t rows, int64_t cols, T scale, T diag_bias, int64_t diag_col0,
                  T* row_m, T* row_l, T* col_m, T* col_l, T* col_max, T* col_sum) {
  const bool with_cols = col_m != nullptr;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> row_max(rows);
  for (int64_t c = 0; c < cols; ++c) col_max[c] = neg_inf;
  T ref = neg_inf;
  for (int64_t r = 0; r < rows; ++r) {
    T* z = S + r * cols;
    T m = neg_inf;
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < cols; ++c) {
      z[c] *= scale;
      m = std::max(m, z[c]);
    }
    const int64_t dc = diag_col0 + r;
    if (diag_bias != T(0) && dc >= 0 && dc < cols) {
      z[dc] += diag_bias;
      m = std::max(m, z[dc]);
    }
    if (with_cols) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) col_max[c] = std::max(col_max[c], z[c]);
    }
    row_max[r] = m;
    ref = std::max(ref, m);
  }
  T lowest = *std::min_element(row_max.begin(), row_max.end());
  if (with_cols) lowest = std::min(lowest, *std::min_element(col_max, col_max + cols));
  const bool one_exp = ref - lowest <= Limits<T>::kMargin;

  for (int64_t c = 0; c < cols; ++c) col_sum[c] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* z = S + r * cols;
    const T shift = one_exp ? ref : row_max[r];
    T s = 0;
    if (one_exp && with_cols) {
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < cols; ++c) {
        const T e = exp_nonpos(z[c] - shift);
        s += e;
        col_sum[c] += e;
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < cols; ++c) s += exp_nonpos(z[c] - shift);
      if (with_cols) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) col_sum[c] += exp_nonpos(z[c] - col_max[c]);
      }
    }
    merge_lse(row_m[r], row_l[r], shift, s);
  }
  if (with_cols) {
    for (int64_t c = 0; c < cols; ++c)
      merge_lse(col_m[c], col_l[c], one_exp ? ref : col_max[c], col_sum[c]);
  }
}

// Backward work on one tile: D = dL/dZ = g_row * exp(Z - row_lse) + g_col * exp(Z - col_lse)
// from the raw dot products S; returns sum(D * S), the tile's share of dL/dscale.
template <typename T>
#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
T backward_tile(const T* S, T* D, int64_t rows, int64_t cols, T scale, T diag_bias,
                int64_t diag_col0, const T* row_lse, const T* col_lse, const T* g_row,
                const T* g_col) {
  // Either term of D may be absent (no gradient flowing into that logsumexp).
  T ref = -std::numeric_limits<T>::infinity();
  T lowest = std::numeric_limits<T>::infinity();
  if (g_row) for (int64_t r = 0; r < rows; ++r) { ref = std::max(ref, row_lse[r]); lowest = std::min(lowest, row_lse[r]); }
  if (g_col) for (int64_t c = 0; c < cols; ++c) { ref = std::max(ref, col_lse[c]); lowest = std::min(lowest, col_lse[c]); }
  // Z <= both logsumexps, so exp(Z - ref) <= 1, and exp(ref - lse) <= e^margin.
  const bool one_exp = g_row && g_col && ref - lowest <= Limits<T>::kMargin;
  std::vector<T> a(cols);
  if (one_exp)
    for (int64_t c = 0; c < cols; ++c) a[c] = g_col[c] * std::exp(ref - col_lse[c]);

  T ds = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = S + r * cols;
    T* d = D + r * cols;
    T acc = 0;
    if (one_exp) {
      const T b = g_row[r] * std::exp(ref - row_lse[r]);
      const T* av = a.data();
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < cols; ++c) {
        d[c] = exp_nonpos(scale * s[c] - ref) * (b + av[c]);
        acc += d[c] * s[c];
      }
    } else {
      if (g_row) {
        const T gr = g_row[r], lr = row_lse[r];
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) d[c] = gr * exp_nonpos(scale * s[c] - lr);
      } else {
        std::fill(d, d + cols, T(0));
      }
      if (g_col) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) d[c] += g_col[c] * exp_nonpos(scale * s[c] - col_lse[c]);
      }
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < cols; ++c) acc += d[c] * s[c];
    }
    // The loops above left out the bias; redo the one biased element exactly.
    const int64_t dc = diag_col0 + r;
    if (diag_bias != T(0) && dc >= 0 && dc < cols) {
      const T z = scale * s[dc] + diag_bias;
      T v = 0;
      if (g_row) v += g_row[r] * std::exp(z - row_lse[r]);
      if (g_col) v += g_col[dc] * std::exp(z - col_lse[dc]);
      acc += (v - d[dc]) * s[dc];
      d[dc] = v;
    }
    ds += acc;
  }
  return ds;
}

struct Plan {
  int64_t n, m, groups, row_blocks, block_rows, block_cols;
  int64_t group_begin(int64_t g) const { return g * row_blocks / groups; }
};

Plan make_plan(int64_t n, int64_t m, int64_t block_rows, int64_t block_cols) {
  TORCH_CHECK(block_rows > 0 && block_cols > 0, "block sizes must be positive");
  Plan p{n, m, 0, (n + block_rows - 1) / block_rows, block_rows, block_cols};
  p.groups = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.row_blocks));
  return p;
}

void check_inputs(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "xfast._C runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), "x, y must be [N, d], [M, d]");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "xfast._C computes in float32 or float64");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& y, double scale_d,
                                     double bias_d, int64_t offset, bool with_cols,
                                     const Plan& p) {
  const T scale = static_cast<T>(scale_d), bias = static_cast<T>(bias_d);
  const auto opts = x.options();
  at::Tensor row_lse = at::empty({p.n}, opts);
  // Per-group column accumulators (m, l), merged in group order below.
  at::Tensor col_acc = with_cols ? at::empty({p.groups, 2, p.m}, opts) : at::Tensor();
  at::parallel_for(0, p.groups, 1, [&](int64_t g0, int64_t g1) {
    at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
    at::Tensor tile = at::empty({p.block_rows * p.block_cols}, opts);
    std::vector<T> col_max(p.block_cols), col_sum(p.block_cols);
    std::vector<T> row_m(p.block_rows), row_l(p.block_rows);
    for (int64_t g = g0; g < g1; ++g) {
      T* col_m = nullptr;
      T* col_l = nullptr;
      if (with_cols) {
        col_m = col_acc[g][0].data_ptr<T>();
        col_l = col_acc[g][1].data_ptr<T>();
        std::fill(col_m, col_m + p.m, -std::numeric_limits<T>::infinity());
        std::fill(col_l, col_l + p.m, T(0));
      }
      for (int64_t b = p.group_begin(g); b < p.group_begin(g + 1); ++b) {
        const int64_t r0 = b * p.block_rows, rows = std::min(p.block_rows, p.n - r0);
        const at::Tensor xb = x.narrow(0, r0, rows);
        std::fill(row_m.begin(), row_m.end(), -std::numeric_limits<T>::infinity());
        std::fill(row_l.begin(), row_l.end(), T(0));
        for (int64_t c0 = 0; c0 < p.m; c0 += p.block_cols) {
          const int64_t cols = std::min(p.block_cols, p.m - c0);
          at::Tensor s = tile.narrow(0, 0, rows * cols).view({rows, cols});
          at::mm_out(s, xb, y.narrow(0, c0, cols).t());
          forward_tile<T>(s.data_ptr<T>(), rows, cols, scale, bias, r0 + offset - c0,
                          row_m.data(), row_l.data(), with_cols ? col_m + c0 : nullptr,
                          with_cols ? col_l + c0 : nullptr, col_max.data(), col_sum.data());
        }
        T* out = row_lse.data_ptr<T>() + r0;
        for (int64_t r = 0; r < rows; ++r) out[r] = row_m[r] + std::log(row_l[r]);
      }
    }
  });
  at::Tensor col_lse;
  if (with_cols) {
    col_lse = at::empty({p.m}, opts);
    T* out = col_lse.data_ptr<T>();
    at::parallel_for(0, p.m, 4096, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        T m = -std::numeric_limits<T>::infinity(), l = 0;
        for (int64_t g = 0; g < p.groups; ++g)
          merge_lse(m, l, col_acc.data_ptr<T>()[(g * 2) * p.m + c],
                    col_acc.data_ptr<T>()[(g * 2 + 1) * p.m + c]);
        out[c] = m + std::log(l);
      }
    });
  }
  return {row_lse, col_lse};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& x, const at::Tensor& y, double scale_d,
                                      double bias_d, int64_t offset, const at::Tensor& row_lse,
                                      const at::Tensor& col_lse, const at::Tensor& g_row,
                                      const at::Tensor& g_col, const Plan& p) {
  const T scale = static_cast<T>(scale_d), bias = static_cast<T>(bias_d);
  const auto opts = x.options();
  const bool has_row = g_row.defined(), has_col = g_col.defined();
  at::Tensor dx = at::zeros_like(x), dy = at::zeros_like(y);
  // Group 0 accumulates straight into dy; the others get their own buffer.
  at::Tensor dy_extra = p.groups > 1 ? at::zeros({p.groups - 1, p.m, y.size(1)}, opts) : at::Tensor();
  std::vector<T> ds_group(p.groups, T(0));
  at::parallel_for(0, p.groups, 1, [&](int64_t g0, int64_t g1) {
    at::NoGradGuard no_grad;
    at::Tensor s_buf = at::empty({p.block_rows * p.block_cols}, opts);
    at::Tensor d_buf = at::empty({p.block_rows * p.block_cols}, opts);
    for (int64_t g = g0; g < g1; ++g) {
      at::Tensor dy_g = g == 0 ? dy : dy_extra[g - 1];
      for (int64_t b = p.group_begin(g); b < p.group_begin(g + 1); ++b) {
        const int64_t r0 = b * p.block_rows, rows = std::min(p.block_rows, p.n - r0);
        const at::Tensor xb = x.narrow(0, r0, rows);
        at::Tensor dxb = dx.narrow(0, r0, rows);
        for (int64_t c0 = 0; c0 < p.m; c0 += p.block_cols) {
          const int64_t cols = std::min(p.block_cols, p.m - c0);
          const at::Tensor yc = y.narrow(0, c0, cols);
          at::Tensor s = s_buf.narrow(0, 0, rows * cols).view({rows, cols});
          at::Tensor d = d_buf.narrow(0, 0, rows * cols).view({rows, cols});
          at::mm_out(s, xb, yc.t());
          ds_group[g] += backward_tile<T>(
              s.data_ptr<T>(), d.data_ptr<T>(), rows, cols, scale, bias, r0 + offset - c0,
              row_lse.data_ptr<T>() + r0, has_col ? col_lse.data_ptr<T>() + c0 : nullptr,
              has_row ? g_row.data_ptr<T>() + r0 : nullptr,
              has_col ? g_col.data_ptr<T>() + c0 : nullptr);
          dxb.addmm_(d, yc, 1, scale);
          dy_g.narrow(0, c0, cols).addmm_(d.t(), xb, 1, scale);
        }
      }
    }
  });
  for (int64_t g = 1; g < p.groups; ++g) dy.add_(dy_extra[g - 1]);
  T ds = 0;
  for (T v : ds_group) ds += v;
  return {dx, dy, at::full({}, ds, opts)};
}

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& y, double scale,
                                double diag_bias, int64_t diag_offset, bool with_cols,
                                int64_t block_rows, int64_t block_cols) {
  check_inputs(x, y);
  const Plan p = make_plan(x.size(0), y.size(0), block_rows, block_cols);
  if (x.scalar_type() == at::kDouble)
    return forward_impl<double>(x, y, scale, diag_bias, diag_offset, with_cols, p);
  return forward_impl<float>(x, y, scale, diag_bias, diag_offset, with_cols, p);
}

std::vector<at::Tensor> backward(const at::Tensor& x, const at::Tensor& y, double scale,
                                 double diag_bias, int64_t diag_offset,
                                 const at::Tensor& row_lse,
                                 const c10::optional<at::Tensor>& col_lse_opt,
                                 const c10::optional<at::Tensor>& grad_row,
                                 const c10::optional<at::Tensor>& grad_col, int64_t block_rows,
                                 int64_t block_cols) {
  check_inputs(x, y);
  const at::Tensor g_row = grad_row.has_value() ? grad_row->contiguous() : at::Tensor();
  const at::Tensor g_col = grad_col.has_value() ? grad_col->contiguous() : at::Tensor();
  const at::Tensor col_lse = col_lse_opt.has_value() ? col_lse_opt->contiguous() : at::Tensor();
  TORCH_CHECK(!g_col.defined() || col_lse.defined(), "grad_col needs col_lse");
  const Plan p = make_plan(x.size(0), y.size(0), block_rows, block_cols);
  if (x.scalar_type() == at::kDouble)
    return backward_impl<double>(x, y, scale, diag_bias, diag_offset, row_lse.contiguous(),
                                 col_lse, g_row, g_col, p);
  return backward_impl<float>(x, y, scale, diag_bias, diag_offset, row_lse.contiguous(),
                              col_lse, g_row, g_col, p);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xfast native CPU kernels";
  m.def("similarity_lse_forward", &forward, "row/column logsumexp of scale * x @ y.T + diag bias",
        py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("diag_bias"), py::arg("diag_offset"),
        py::arg("with_cols"), py::arg("block_rows"), py::arg("block_cols"));
  m.def("similarity_lse_backward", &backward, "gradients of similarity_lse_forward",
        py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("diag_bias"), py::arg("diag_offset"),
        py::arg("row_lse"), py::arg("col_lse"), py::arg("grad_row"), py::arg("grad_col"),
        py::arg("block_rows"), py::arg("block_cols"));
}
