// Row and column logsumexp of Z = scale * X Y^T + B, tile by tile, on CPU.
//
// B is zero except B[i, offset + i] = diag_bias (SimCSE's hard-negative log-weight).
// Every contrastive loss in xfast is this op plus O(N*d) terms: the forward is one pass of
// GEMM tiles (X_blk @ Y_tile^T) with online logsumexp for rows and columns, the backward
// recomputes each tile from the saved logsumexps and feeds it to two GEMMs (dX, dY), so the
// whole loss costs four N x M x d GEMMs and nothing of size N x M is ever stored. The
// element-wise work on a tile is in similarity_lse_tiles.cpp.
//
// Threads: rows and columns are each split into G groups, making G x G cells. Cell (r, k) is
// row group r with column group (r + k) mod G; the cells of one k touch pairwise disjoint rows
// and columns, so each cell updates its rows' and its columns' accumulators (forward) and its
// slices of dX and dY (backward) in place: the extra memory is one tile per thread plus
// O(N + M + G^2), whatever the thread count. Row group r sees its cells in the order
// k = 0, 1, ..., and so does every column group, so results are bitwise reproducible for a
// given G (a given thread count). The cells are handed out from one atomic counter in that
// order, and a cell only waits for the two cells before it in its row group and its column
// group, (r, k - 1) and (r + 1, k - 1): no barrier between the k's. With G = 4 x threads
// (kGroupsPerThread; fewer, down to G = threads, where the tiles do not allow as many) a thread
// whose core runs slower holds up no one but the one or two cells that follow its own (with
// G = threads, a wait for both predecessors would be the barrier).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#include "similarity_lse_tiles.h"

namespace {

using xfast::tile_kernels;

// Group boundaries on multiples of 16 (whole SIMD vectors in the tile loops) where possible.
constexpr int64_t kAlign = 16;
// Up to this many groups per thread: the slack that lets cells run ahead of a slower thread.
constexpr int64_t kGroupsPerThread = 4;

struct Plan {
  int64_t n, m, block_rows, block_cols, groups, workers;

  static int64_t split(int64_t total, int64_t parts, int64_t g) {
    if (g >= parts) return total;
    const int64_t units = total / kAlign;
    return units >= parts ? g * units / parts * kAlign : g * total / parts;
  }
  int64_t row_begin(int64_t g) const { return split(n, groups, g); }
  int64_t col_begin(int64_t g) const { return split(m, groups, g); }
};

Plan make_plan(int64_t n, int64_t m, int64_t block_rows, int64_t block_cols) {
  TORCH_CHECK(block_rows > 0 && block_cols > 0, "block sizes must be positive");
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // At least one group per thread (all busy), more while a cell keeps at least one whole
  // tile (smaller tiles would make the GEMMs less efficient), at most kGroupsPerThread each.
  const int64_t whole_tiles = std::min((n + block_rows - 1) / block_rows, (m + block_cols - 1) / block_cols);
  const int64_t wanted = std::max(threads, std::min(whole_tiles, kGroupsPerThread * threads));
  // Below kAlign rows or columns per group a cell is too small to be worth a thread.
  const int64_t most = std::max<int64_t>(1, std::min(n, m) / kAlign);
  const int64_t groups = std::min(wanted, most);
  return {n, m, block_rows, block_cols, groups, std::min(threads, groups)};
}

// Waits until flag is set (or another cell failed: then returns false).
inline bool wait_for(const std::atomic<bool>& flag, const std::atomic<bool>& failed) {
  for (int spins = 0; !flag.load(std::memory_order_acquire); ++spins) {
    if (failed.load(std::memory_order_relaxed)) return false;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (spins >= 64) std::this_thread::yield();  // a wait longer than a few us: let its core go
  }
  return true;
}

// Runs task(worker, i) for i in [0, count), taken from a shared counter by up to `threads`
// workers. A task's result must not depend on which worker runs it (scratch only): then the
// results are the same however the tasks are handed out.
template <typename F>
void for_each_task(int64_t threads, int64_t count, const F& task) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, count), 1, [&](int64_t w0, int64_t w1) {
    at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) task(w, i);
  });
}

// Calls cell(worker, r, c) for every row group r and column group c, cell (r, k) = (r, (r + k)
// mod G) taken in the order k = 0, 1, ... from a shared counter by p.workers threads (worker:
// the caller's index in [0, workers), for its scratch). ordered: a cell waits until the cells
// (r, k - 1) and (r + 1, k - 1), the previous ones of its row and its column group, are done
// (the cells of a k touch disjoint rows and columns, so each cell's updates are then in a
// fixed order). A taken cell's predecessors were taken before it, so the earliest unfinished
// cell never waits: no deadlock, whatever the number of threads that actually run.
template <typename F>
void for_each_cell(const Plan& p, bool ordered, const F& cell) {
  const int64_t g = p.groups, cells = g * g;
  std::atomic<bool> failed{false};
  const std::unique_ptr<std::atomic<bool>[]> done(new std::atomic<bool>[cells]);
  for (int64_t i = 0; i < cells; ++i) done[i].store(false, std::memory_order_relaxed);
  for_each_task(p.workers, cells, [&](int64_t w, int64_t i) {
    const int64_t k = i / g, r = i % g;
    if (failed.load(std::memory_order_relaxed)) return;  // after a failure no further cell runs
    if (ordered && k > 0 &&
        !(wait_for(done[i - g], failed) && wait_for(done[(k - 1) * g + (r + 1) % g], failed)))
      return;
    try {
      cell(w, r, (r + k) % g);
    } catch (...) {
      failed.store(true);  // releases the cells waiting for this one; parallel_for rethrows
      throw;
    }
    done[i].store(true, std::memory_order_release);
  });
}

// Calls tile(r0, rows, c0, cols) for the tiles of cell (r, c), column block by column block:
// a column block of Y (and of dY) stays in cache while the smaller row blocks stream past.
template <typename F>
void for_each_tile(const Plan& p, int64_t r, int64_t c, const F& tile) {
  const int64_t re = p.row_begin(r + 1), ce = p.col_begin(c + 1);
  for (int64_t c0 = p.col_begin(c); c0 < ce; c0 += p.block_cols)
    for (int64_t r0 = p.row_begin(r); r0 < re; r0 += p.block_rows)
      tile(r0, std::min(p.block_rows, re - r0), c0, std::min(p.block_cols, ce - c0));
}

// Per-thread working memory: a tile and the tile kernels' vectors, no larger than the
// largest cell needs.
struct Scratch {
  at::Tensor tiles;   // [workers, tile rows * tile cols]
  at::Tensor values;  // [workers, 2 * tile cols + tile rows]
  Scratch(const Plan& p, const at::TensorOptions& opts) {
    int64_t rows = 0, cols = 0;
    for (int64_t g = 0; g < p.groups; ++g) {
      rows = std::max(rows, std::min(p.block_rows, p.row_begin(g + 1) - p.row_begin(g)));
      cols = std::max(cols, std::min(p.block_cols, p.col_begin(g + 1) - p.col_begin(g)));
    }
    tiles = at::empty({p.workers, rows * cols}, opts);
    values = at::empty({p.workers, 2 * cols + rows}, opts);
  }
  at::Tensor tile(int64_t w, int64_t rows, int64_t cols) const {
    return tiles[w].narrow(0, 0, rows * cols).view({rows, cols});
  }
};

// z = scale * x y^T, the scale applied by the GEMM as it stores each element: no separate pass
// over the tile, and the forward and the backward, making the same call on the same operands,
// get bitwise the same Z (exp(Z - lse) in the backward must see the Z its lse summed).
void scaled_dot_products(at::Tensor& z, const at::Tensor& x, const at::Tensor& y, double scale) {
  at::addmm_out(z, z, x, y.t(), /*beta=*/0, /*alpha=*/scale);
}

// The scale in the kernel's dtype T. The public losses check their scale; the kernel entries
// check it again because a zero scale would turn dscale = sum(D * Z) / scale into NaN and a
// negative one would flip the logits. Checked after the cast: a positive double below float32's
// smallest subnormal becomes 0 there, and one above its largest finite value becomes inf.
template <typename T>
const char* dtype_name() {
  return std::is_same<T, float>::value ? "float32" : "float64";
}

template <typename T>
T kernel_scale(double scale) {
  const T s = static_cast<T>(scale);
  TORCH_CHECK(std::isfinite(s) && s > 0, "scale must be positive and finite in ", dtype_name<T>(), ", got ", scale);
  return s;
}

// The diagonal bias in T, checked after the cast for the same reason: a finite double above
// float32's largest value (SimCSE's hard_negative_weight = 1e39) would be an inf logit there.
template <typename T>
T kernel_bias(double bias) {
  const T b = static_cast<T>(bias);
  TORCH_CHECK(std::isfinite(b), "diag_bias must be finite in ", dtype_name<T>(), ", got ", bias);
  return b;
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
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& y, double scale_d, double bias_d,
                                     int64_t offset, bool with_cols, const Plan& p) {
  const T scale = kernel_scale<T>(scale_d), bias = kernel_bias<T>(bias_d);
  const auto opts = x.options();
  const auto& kernels = tile_kernels<T>();
  // Running (m, l) accumulators, m + log(l), of every row and column.
  std::vector<T> row_m(p.n, -std::numeric_limits<T>::infinity()), row_l(p.n, T(0));
  std::vector<T> col_m(with_cols ? p.m : 0, -std::numeric_limits<T>::infinity()), col_l(col_m.size(), T(0));
  const Scratch scratch(p, opts);
  for_each_cell(p, /*ordered=*/true, [&](int64_t w, int64_t r, int64_t c) {
    for_each_tile(p, r, c, [&](int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
      at::Tensor z = scratch.tile(w, rows, cols);
      scaled_dot_products(z, x.narrow(0, r0, rows), y.narrow(0, c0, cols), scale);
      kernels.forward(z.data_ptr<T>(), rows, cols, bias, r0 + offset - c0, row_m.data() + r0, row_l.data() + r0,
                      with_cols ? col_m.data() + c0 : nullptr, with_cols ? col_l.data() + c0 : nullptr,
                      scratch.values[w].data_ptr<T>());
    });
  });
  const auto lse = [&](const std::vector<T>& m, const std::vector<T>& l) {
    at::Tensor out = at::empty({static_cast<int64_t>(m.size())}, opts);
    T* o = out.data_ptr<T>();
    for (size_t i = 0; i < m.size(); ++i) o[i] = m[i] + std::log(l[i]);
    return out;
  };
  return {lse(row_m, row_l), with_cols ? lse(col_m, col_l) : at::Tensor()};
}

// dY accumulated over tiles, dY[c0 : c0 + cols] += scale * D^T X_blk. At small d it is kept
// transposed, dY^T += X_blk^T D: D then enters the GEMM untransposed (D^T X_blk packs the large
// D transposed and ran ~15% slower at d = 64, only a few % at d = 512, where the whole loss ran
// slower with the transposed layout). Its rows are padded by one cache line so that a
// power-of-two M does not put them all in the same cache sets.
template <typename T>
struct DyAccumulator {
  explicit DyAccumulator(const at::Tensor& y) : transposed(y.size(1) <= 128) {
    const int64_t m = y.size(0), ld = m + 64 / static_cast<int64_t>(sizeof(T));
    sum = transposed ? at::zeros({y.size(1), ld}, y.options()).narrow(1, 0, m) : at::zeros_like(y);
  }
  void add(int64_t c0, const at::Tensor& d, const at::Tensor& xb, T scale) {
    if (transposed)
      sum.narrow(1, c0, d.size(1)).addmm_(xb.t(), d, 1, scale);
    else
      sum.narrow(0, c0, d.size(1)).addmm_(d.t(), xb, 1, scale);
  }
  at::Tensor result() const { return transposed ? sum.t().contiguous() : sum; }

  const bool transposed;
  at::Tensor sum;
};

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& x, const at::Tensor& y, double scale_d, double bias_d,
                                      int64_t offset, const at::Tensor& row_lse, const at::Tensor& col_lse,
                                      const at::Tensor& g_row, const at::Tensor& g_col, const Plan& p) {
  const T scale = kernel_scale<T>(scale_d), bias = kernel_bias<T>(bias_d);
  const auto& kernels = tile_kernels<T>();
  const bool has_row = g_row.defined(), has_col = g_col.defined();
  at::Tensor dx = at::zeros_like(x);
  DyAccumulator<T> dy(y);
  std::vector<double> ds_cell(p.groups * p.groups, 0.0);
  const Scratch scratch(p, x.options());
  for_each_cell(p, /*ordered=*/true, [&](int64_t w, int64_t r, int64_t c) {
    for_each_tile(p, r, c, [&](int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
      const at::Tensor xb = x.narrow(0, r0, rows), yc = y.narrow(0, c0, cols);
      at::Tensor d = scratch.tile(w, rows, cols);
      scaled_dot_products(d, xb, yc, scale);  // Z as the forward saw it, turned into dL/dZ in place
      ds_cell[r * p.groups + c] += kernels.backward(
          d.data_ptr<T>(), rows, cols, bias, r0 + offset - c0, row_lse.data_ptr<T>() + r0,
          has_col ? col_lse.data_ptr<T>() + c0 : nullptr, has_row ? g_row.data_ptr<T>() + r0 : nullptr,
          has_col ? g_col.data_ptr<T>() + c0 : nullptr, scratch.values[w].data_ptr<T>());
      dx.narrow(0, r0, rows).addmm_(d, yc, 1, scale);
      dy.add(c0, d, xb, scale);
    });
  });
  double ds = 0;  // sum(D * S) = sum(D * (Z - B)) / scale, with the scale Z was computed with
  for (double v : ds_cell) ds += v;
  ds /= static_cast<double>(scale);
  return {dx, dy.result(), at::full({}, ds, x.options())};
}

// Rows of dX computed by one task of the slab's third step (a fixed count: the task grid does
// not depend on the thread count).
constexpr int64_t kPieceRows = 64;

// Row logsumexp AND its gradients for row-only losses (SimCSE), with every row weighed
// equally (dL/drow_lse = 1): 3 GEMM-equivalents instead of the forward's one plus the
// backward's three. Rows go in slabs of slab_rows x M, stored chunk by chunk (chunk j holds
// columns [j * chunk_cols, ...) as a contiguous rows x cols tile, the tile kernels' layout):
//   1. per chunk (in parallel): S = scale * X_slab Y_j^T into the slab, its row (m, l) accumulators;
//      then each row's logsumexp, exact, merging the chunks in order;
//   2. per chunk: P = exp(S + B - lse) in place (the backward tile kernel, g_row = 1), its
//      share of sum(P * S), and dY_j += scale * P_j^T X_slab (each chunk owns its rows of dY);
//   3. per piece of kPieceRows rows: dX_piece = scale * sum_j P_j[piece] Y_j.
// Extra memory: the slab (slab_rows * M values, whatever the thread count) and O(chunk_cols)
// per thread. Every task's result is independent of the thread that runs it and every sum is
// taken in a fixed order, so results are bitwise reproducible for a given thread count.
// Returns row_lse, dX, dY and sum(P * S) (the three gradients for dL/drow_lse = 1, dscale =
// sum(P * S)); a caller whose upstream gradient is c for every row scales them by c.
template <typename T>
std::vector<at::Tensor> rows_with_gradients_impl(const at::Tensor& x, const at::Tensor& y, double scale_d,
                                                 double bias_d, int64_t offset, int64_t slab_rows,
                                                 int64_t chunk_cols) {
  const T scale = kernel_scale<T>(scale_d), bias = kernel_bias<T>(bias_d);
  const auto& kernels = tile_kernels<T>();
  const auto opts = x.options();
  const int64_t n = x.size(0), m = y.size(0), threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t h = std::max<int64_t>(1, std::min(slab_rows, n)), chunks = (m + chunk_cols - 1) / chunk_cols;
  at::Tensor row_lse = at::empty({n}, opts), dx = at::empty_like(x);
  DyAccumulator<T> dy(y);
  at::Tensor slab = at::empty({h * chunks * chunk_cols}, opts);
  at::Tensor scratch = at::empty({std::min(threads, std::max<int64_t>(chunks, 1)), 2 * chunk_cols + h}, opts);
  std::vector<T> chunk_m(chunks * h), chunk_l(chunks * h), diag(h), ones(h, T(1));
  std::vector<double> ds_chunk(chunks);
  double ds = 0;
  T* lse = row_lse.data_ptr<T>();
  for (int64_t r0 = 0; r0 < n; r0 += h) {
    const int64_t rows = std::min(h, n - r0);
    const at::Tensor xb = x.narrow(0, r0, rows);
    const auto tile = [&](int64_t j, int64_t r, int64_t count) {  // rows [r, r + count) of chunk j
      const int64_t cols = std::min(chunk_cols, m - j * chunk_cols);
      return slab.narrow(0, j * h * chunk_cols + r * cols, count * cols).view({count, cols});
    };
    for_each_task(threads, chunks, [&](int64_t w, int64_t j) {
      const int64_t c0 = j * chunk_cols, diag_col0 = r0 + offset - c0;
      at::Tensor z = tile(j, 0, rows);
      const int64_t cols = z.size(1);
      scaled_dot_products(z, xb, y.narrow(0, c0, cols), scale);
      // The forward tile kernel adds the bias in place; the second step needs Z without it,
      // bitwise as the GEMM wrote it: keep the biased elements (at most one per row) aside.
      T* zp = z.data_ptr<T>();
      const int64_t first = std::max<int64_t>(0, -diag_col0), last = std::min(rows, cols - diag_col0);
      if (bias != T(0))
        for (int64_t r = first; r < last; ++r) diag[r] = zp[r * cols + diag_col0 + r];
      T* cm = chunk_m.data() + j * h;
      T* cl = chunk_l.data() + j * h;
      std::fill(cm, cm + rows, -std::numeric_limits<T>::infinity());
      std::fill(cl, cl + rows, T(0));
      kernels.forward(zp, rows, cols, bias, diag_col0, cm, cl, nullptr, nullptr, scratch[w].data_ptr<T>());
      if (bias != T(0))
        for (int64_t r = first; r < last; ++r) zp[r * cols + diag_col0 + r] = diag[r];
    });
    for (int64_t r = 0; r < rows; ++r) {
      T mr = -std::numeric_limits<T>::infinity(), lr = 0;
      for (int64_t j = 0; j < chunks; ++j) xfast::merge_lse(mr, lr, chunk_m[j * h + r], chunk_l[j * h + r]);
      lse[r0 + r] = mr + std::log(lr);
    }
    for_each_task(threads, chunks, [&](int64_t w, int64_t j) {
      const int64_t c0 = j * chunk_cols;
      at::Tensor p = tile(j, 0, rows);
      const int64_t cols = p.size(1);
      ds_chunk[j] = kernels.backward(p.data_ptr<T>(), rows, cols, bias, r0 + offset - c0, lse + r0, nullptr,
                                     ones.data(), nullptr, scratch[w].data_ptr<T>());
      dy.add(c0, p, xb, scale);
    });
    for (int64_t j = 0; j < chunks; ++j) ds += ds_chunk[j];
    for_each_task(threads, (rows + kPieceRows - 1) / kPieceRows, [&](int64_t, int64_t i) {
      const int64_t r = i * kPieceRows, count = std::min(kPieceRows, rows - r);
      at::Tensor dxp = dx.narrow(0, r0 + r, count);
      for (int64_t j = 0; j < chunks; ++j) {
        const at::Tensor pj = tile(j, r, count);
        at::addmm_out(dxp, dxp, pj, y.narrow(0, j * chunk_cols, pj.size(1)), /*beta=*/j == 0 ? 0 : 1, scale);
      }
    });
  }
  if (chunks == 0) { dx.zero_(); row_lse.fill_(-std::numeric_limits<T>::infinity()); }
  return {row_lse, dx, dy.result(),
          at::full({}, ds / static_cast<double>(scale), opts)};
}

// The kernel's GEMMs and nothing else: gemms_per_tile products X_blk @ Y_tile^T into each
// thread's one reused tile, over the same cells and tiles. With 4 per tile it is the compute
// floor of forward+backward (benchmarks/bench_losses.py). Its cells share no accumulator, so
// they never wait for one another: its schedule is the kernel's counter without the waits.
void tile_gemm_floor(const at::Tensor& x, const at::Tensor& y, int64_t gemms_per_tile, int64_t block_rows,
                     int64_t block_cols) {
  check_inputs(x, y);
  const Plan p = make_plan(x.size(0), y.size(0), block_rows, block_cols);
  const Scratch scratch(p, x.options());
  for_each_cell(p, /*ordered=*/false, [&](int64_t w, int64_t r, int64_t c) {
    for_each_tile(p, r, c, [&](int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
      at::Tensor s = scratch.tile(w, rows, cols);
      for (int64_t i = 0; i < gemms_per_tile; ++i) at::mm_out(s, x.narrow(0, r0, rows), y.narrow(0, c0, cols).t());
    });
  });
}

// exp of values <= 0 with the tile kernels' own exp (the variant in use; tests). float32 runs
// the variant's polynomial; float64 is plain std::exp, as in the tile kernels.
at::Tensor tile_exp(const at::Tensor& v) {
  TORCH_CHECK(v.device().is_cpu() && (v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble),
              "tile_exp takes a float32 or float64 CPU tensor");
  // Outside [-inf, 0] (-inf is a masked logit, exp 0) the float32 exp is wrong (no overflow
  // handling) rather than slow: refuse.
  TORCH_CHECK(v.le(0).all().item<bool>(), "tile_exp computes exp of values <= 0; got a value > 0 or NaN");
  at::Tensor out = v.contiguous().clone();
  if (out.scalar_type() == at::kDouble) tile_kernels<double>().exp(out.data_ptr<double>(), out.numel());
  else tile_kernels<float>().exp(out.data_ptr<float>(), out.numel());
  return out;
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

std::vector<at::Tensor> rows_with_gradients(const at::Tensor& x, const at::Tensor& y, double scale, double diag_bias,
                                            int64_t diag_offset, int64_t slab_rows, int64_t chunk_cols) {
  check_inputs(x, y);
  TORCH_CHECK(slab_rows > 0 && chunk_cols > 0, "slab_rows and chunk_cols must be positive");
  if (x.scalar_type() == at::kDouble)
    return rows_with_gradients_impl<double>(x, y, scale, diag_bias, diag_offset, slab_rows, chunk_cols);
  return rows_with_gradients_impl<float>(x, y, scale, diag_bias, diag_offset, slab_rows, chunk_cols);
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
  m.def("similarity_lse_rows_with_gradients", &rows_with_gradients,
        "row logsumexp of scale * x @ y.T + diag bias and its gradients (dx, dy, d/dscale) for unit row weights",
        py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("diag_bias"), py::arg("diag_offset"),
        py::arg("slab_rows"), py::arg("chunk_cols"));
  m.def("tile_gemm_floor", &tile_gemm_floor,
        "only the kernel's GEMMs: gemms_per_tile x @ y.T tiles into one reused tile per thread",
        py::arg("x"), py::arg("y"), py::arg("gemms_per_tile"), py::arg("block_rows"), py::arg("block_cols"));
  m.def("tile_exp", &tile_exp, "exp of values <= 0 as the tile kernels compute it (tests)", py::arg("v"));
  m.def("tile_isa", &xfast::tile_isa, "instruction set of the float32 tile kernels in use");
  m.def("supported_tile_isas", &xfast::supported_tile_isas, "tile kernel variants this CPU runs, best first");
  m.def("select_tile_isa", &xfast::select_tile_isa, "switch the float32 tile kernels (tests)", py::arg("isa"));
}
