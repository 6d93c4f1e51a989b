#include <torch/extension.h>
#include <immintrin.h>
#include <vector>
#include <cstring>

// C[rows x cols] = alpha * A[rows x K] * B[cols x K]^T, A,B row-major (X block, Y block).
constexpr int MR = 6, NR = 16;

__attribute__((target("avx2,fma")))
static void pack_a(const float* a, int64_t lda, int64_t rows, int64_t k0, int64_t kc, float* out) {
  // panels of MR rows, k-major: out[p][k][r]
  for (int64_t i0 = 0; i0 < rows; i0 += MR) {
    const int64_t mr = std::min<int64_t>(MR, rows - i0);
    for (int64_t k = 0; k < kc; ++k) {
      for (int r = 0; r < MR; ++r) out[k * MR + r] = r < mr ? a[(i0 + r) * lda + k0 + k] : 0.f;
    }
    out += MR * kc;
  }
}

__attribute__((target("avx2,fma")))
static void pack_b(const float* b, int64_t ldb, int64_t cols, int64_t k0, int64_t kc, float* out) {
  // panels of NR columns, k-major: out[p][k][c]; transposes 8x8 blocks
  for (int64_t j0 = 0; j0 < cols; j0 += NR) {
    const int64_t nr = std::min<int64_t>(NR, cols - j0);
    if (nr == NR) {
      for (int64_t k = 0; k < kc; k += 8) {
        if (k + 8 <= kc) {
          for (int h = 0; h < 2; ++h) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(b + (j0 + h * 8 + i) * ldb + k0 + k);
            // 8x8 transpose
            __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
            __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
            __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
            __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            __m256 o[8];
            o[0] = _mm256_permute2f128_ps(u0, u4, 0x20); o[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
            o[2] = _mm256_permute2f128_ps(u2, u6, 0x20); o[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
            o[4] = _mm256_permute2f128_ps(u0, u4, 0x31); o[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
            o[6] = _mm256_permute2f128_ps(u2, u6, 0x31); o[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (k + i) * NR + h * 8, o[i]);
          }
        } else {
          for (int64_t kk = k; kk < kc; ++kk)
            for (int c = 0; c < NR; ++c) out[kk * NR + c] = b[(j0 + c) * ldb + k0 + kk];
        }
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int c = 0; c < NR; ++c) out[k * NR + c] = c < nr ? b[(j0 + c) * ldb + k0 + k] : 0.f;
    }
    out += NR * kc;
  }
}

__attribute__((target("avx2,fma"), always_inline)) inline
void micro_6x16(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                float alpha, bool accumulate, int64_t mr, int64_t nr, int64_t lda = 0) {
  // lda > 0: A unpacked, row r at a + r * lda (rows past mr clamped to the last one)
  const float* ar[MR];
  for (int r = 0; r < MR; ++r) ar[r] = lda ? a + std::min<int64_t>(r, mr - 1) * lda : a + r;
  const int64_t ks = lda ? 1 : MR;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 av;
    const int64_t ko = k * ks;
    av = _mm256_broadcast_ss(ar[0] + ko); c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(ar[1] + ko); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(ar[2] + ko); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(ar[3] + ko); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(ar[4] + ko); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(ar[5] + ko); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    b += NR;
  }
  __m256 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
  const __m256 al = _mm256_set1_ps(alpha);
  if (mr == MR && nr == NR) {
    for (int r = 0; r < MR; ++r) for (int h = 0; h < 2; ++h) {
      __m256 v = acc[2 * r + h];
      float* p = c + r * ldc + h * 8;
      if (accumulate) v = _mm256_fmadd_ps(v, al, _mm256_loadu_ps(p)); else v = _mm256_mul_ps(v, al);
      _mm256_storeu_ps(p, v);
    }
  } else {
    alignas(32) float tmp[MR * NR];
    for (int i = 0; i < 12; ++i) _mm256_store_ps(tmp + 8 * i, _mm256_mul_ps(acc[i], al));
    for (int r = 0; r < mr; ++r) for (int j = 0; j < nr; ++j)
      c[r * ldc + j] = accumulate ? c[r * ldc + j] + tmp[r * NR + j] : tmp[r * NR + j];
  }
}

// c = alpha a b^T, with the packed B kept across calls when pack_b_each is false
struct Packs { std::vector<float, std::allocator<float>> a, b; };

__attribute__((target("avx2,fma")))
void gemm_nt(torch::Tensor c, torch::Tensor a, torch::Tensor b, double alpha, int64_t kc_max, bool repack_b, int64_t order) {
  for (const auto* t : {&c, &a, &b}) {
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == torch::kFloat && t->device().is_cpu() && t->stride(1) == 1,
                "gemm_nt: c, a, b must be 2-D float32 CPU tensors with unit column stride");
  }
  TORCH_CHECK(a.stride(0) == a.size(1) && b.stride(0) == b.size(1), "gemm_nt: a and b must be contiguous rows");
  TORCH_CHECK(a.size(1) == b.size(1), "gemm_nt: a has K = ", a.size(1), " but b has ", b.size(1));
  TORCH_CHECK(c.size(0) == a.size(0) && c.size(1) == b.size(0), "gemm_nt: c must be ", a.size(0), " x ", b.size(0),
              ", got ", c.size(0), " x ", c.size(1));
  TORCH_CHECK(kc_max != 0 && (order == 0 || order == 1), "gemm_nt: kc_max must be nonzero (-1: A unpacked), order 0 or 1");
  static float* pa = nullptr; static float* pb = nullptr; static size_t na = 0, nb = 0;
  const int64_t rows = a.size(0), cols = b.size(0), K = a.size(1);
  const int64_t rp = (rows + MR - 1) / MR * MR, cp = (cols + NR - 1) / NR * NR;
  if (na < size_t(rp * K)) { free(pa); pa = (float*)aligned_alloc(64, rp * K * 4 + 64); na = rp * K; }
  if (nb < size_t(cp * K)) { free(pb); pb = (float*)aligned_alloc(64, cp * K * 4 + 64); nb = cp * K; repack_b = true; }
  const float* A = a.data_ptr<float>(); const float* B = b.data_ptr<float>(); float* C = c.data_ptr<float>();
  const int64_t ldc = c.stride(0);
  const bool direct = kc_max < 0;
  if (direct) kc_max = K;
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    if (!direct) pack_a(A, K, rows, k0, kc, pa + k0 * rp);
    if (repack_b) pack_b(B, K, cols, k0, kc, pb + k0 * cp);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    const float* PA = pa + k0 * rp; const float* PB = pb + k0 * cp;
    if (order == 0) {
      for (int64_t j = 0; j < cols; j += NR)
        for (int64_t i = 0; i < rows; i += MR)
          micro_6x16(kc, (direct ? A + i * K : PA + i * kc), PB + j * kc, C + i * ldc + j, ldc, alpha, k0 > 0,
                     std::min<int64_t>(MR, rows - i), std::min<int64_t>(NR, cols - j), direct ? K : 0);
    } else {
      for (int64_t i = 0; i < rows; i += MR)
        for (int64_t j = 0; j < cols; j += NR)
          micro_6x16(kc, (direct ? A + i * K : PA + i * kc), PB + j * kc, C + i * ldc + j, ldc, alpha, k0 > 0,
                     std::min<int64_t>(MR, rows - i), std::min<int64_t>(NR, cols - j), direct ? K : 0);
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemm_nt", &gemm_nt); }
