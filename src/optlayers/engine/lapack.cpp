// The operators optlayers_lapack::cholesky_lower, optlayers_lapack::trsv_lower,
// optlayers_lapack::add_product_where, optlayers_lapack::coupled_schur and
// optlayers_lapack::cholesky_inverse_lower, which compiled solves call on the CPU where torch's LAPACK
// is MKL (engine/lapack.py, FACTORED_DTYPES): the lower Cholesky factor of each matrix of a
// (..., n, n) symmetric batch, with LAPACK's info per matrix, the triangular solves with such factors
// of a (..., n) batch of vectors, the batched product C + A B of the matrices that a mask marks, the
// Schur complement of the rows a mask marks and its factor, and a factor with its inverse.
// The factorisation and the product skip the matrices the mask leaves out (problems that have
// finished, whose factors nothing reads). The routines are those lapack.py chooses and hands over
// once by address (set_routines): the factorisation (scipy's potf2, or MKL's potrf from torch's
// library on an Intel processor), scipy's trsv and trti2, torch's own product and triangular solve:
// this file links against nothing but torch. An operator whose outputs (their shapes or strides)
// or arguments change must change its name: inductor's graph cache knows a compiled graph by the
// names of the operators it calls, not by their schemas or fake kernels (lapack.py), so that a graph
// compiled against the old operator would be reused (an argument added to the factorisation's
// operator under its old name crashed the cached graphs that called it with the old arguments).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// LAPACK's xPOTF2(UPLO, N, A, LDA, INFO) (or xPOTRF, which takes the same arguments) and BLAS's xTRSV(UPLO, TRANS, DIAG, N, A, LDA, X, INCX),
// for float and double alike (arrays by address).
// BLAS's xGEMM(TRANSA, TRANSB, M, N, K, ALPHA, A, LDA, B, LDB, BETA, C, LDC) likewise: torch's own
// (MKL's, where lapack.py finds it in torch's library), for the product operator.
using Potf2 = void (*)(char*, int*, void*, int*, int*);
using Trsv = void (*)(char*, char*, char*, int*, void*, int*, void*, int*);
using Gemm = void (*)(char*, char*, int*, int*, int*, void*, void*, int*, void*, int*, void*, void*, int*);
// BLAS's xTRSM(SIDE, UPLO, TRANSA, DIAG, M, N, ALPHA, A, LDA, B, LDB): torch's own, as the product's.
using Trsm = void (*)(char*, char*, char*, char*, int*, int*, void*, void*, int*, void*, int*);
// LAPACK's xTRTI2(UPLO, DIAG, N, A, LDA, INFO), the inverse of a triangular matrix in place: scipy's.
using Trti2 = void (*)(char*, char*, int*, void*, int*, int*);

struct Routines {
  Potf2 potf2 = nullptr;
  Trsv trsv = nullptr;
  Gemm gemm = nullptr;
  Trsm trsm = nullptr;
  Trti2 trti2 = nullptr;
};

Routines doubles;
Routines floats;

void set_routines(int64_t double_potf2, int64_t float_potf2, int64_t double_trsv, int64_t float_trsv, int64_t double_gemm,
                  int64_t float_gemm, int64_t double_trsm, int64_t float_trsm, int64_t double_trti2, int64_t float_trti2) {
  doubles = {reinterpret_cast<Potf2>(double_potf2), reinterpret_cast<Trsv>(double_trsv), reinterpret_cast<Gemm>(double_gemm),
             reinterpret_cast<Trsm>(double_trsm), reinterpret_cast<Trti2>(double_trti2)};
  floats = {reinterpret_cast<Potf2>(float_potf2), reinterpret_cast<Trsv>(float_trsv), reinterpret_cast<Gemm>(float_gemm),
            reinterpret_cast<Trsm>(float_trsm), reinterpret_cast<Trti2>(float_trti2)};
}

const Routines* routines_for(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? &doubles : t.scalar_type() == at::kFloat ? &floats : nullptr;
}

// The (B,) bool mask `active` (or none: every matrix) as a pointer to B flags, checked against the batch.
const bool* active_flags(const c10::optional<at::Tensor>& active, int64_t count, at::Tensor& kept, const char* name) {
  if (!active.has_value()) return nullptr;
  TORCH_CHECK(active->scalar_type() == at::kBool && active->device().is_cpu() && active->numel() == count,
              name, ": active must be a CPU bool tensor of one flag per matrix (", count, "), got ", active->scalar_type(),
              " of shape ", active->sizes(), " on ", active->device());
  kept = active->contiguous();
  return kept.data_ptr<bool>();
}

// A row-major symmetric matrix read column-major is itself, and LAPACK's upper factor U of it,
// read row-major, is the lower factor L = U^T: so 'U' on the row-major copy, then its upper
// triangle zeroed. A matrix that `active` leaves out is not factorised: its factor is the identity
// (info 0), so that it stays finite wherever it is read.
std::tuple<at::Tensor, at::Tensor> cholesky_lower(const at::Tensor& M, const c10::optional<at::Tensor>& active) {
  TORCH_CHECK(M.dim() >= 2 && M.size(-1) == M.size(-2), "cholesky_lower: M must be a batch of square matrices, got shape ",
              M.sizes());
  TORCH_CHECK(M.device().is_cpu(), "cholesky_lower: M must be on the CPU, got ", M.device());
  const Routines* found = routines_for(M);
  Potf2 routine = found == nullptr ? nullptr : found->potf2;
  TORCH_CHECK(routine != nullptr, "cholesky_lower: no factorisation routine for dtype ", M.scalar_type(),
              " (float32 and float64, after set_routines)");
  at::Tensor factor = M.clone(at::MemoryFormat::Contiguous);
  int n = static_cast<int>(M.size(-1));
  at::Tensor info = at::zeros(M.sizes().slice(0, M.dim() - 2), M.options().dtype(at::kInt));
  char upper = 'U';
  const int64_t count = info.numel();
  TORCH_CHECK(!active.has_value() || M.dim() == 3, "cholesky_lower: a mask needs a (B, n, n) batch, got shape ", M.sizes());
  at::Tensor kept;
  const bool* on = active_flags(active, count, kept, "cholesky_lower");
  const int64_t stride = static_cast<int64_t>(n) * n * factor.element_size();
  char* first = static_cast<char*>(factor.data_ptr());
  int* reports = info.data_ptr<int>();
  const size_t entry = factor.element_size();
  for (int64_t k = 0; k < count; ++k) {
    if (on == nullptr || on[k]) {
      char* matrix = first + k * stride;
      routine(&upper, &n, matrix, &n, reports + k);
      for (int64_t i = 0; i + 1 < n; ++i) {  // the upper triangle zeroed while the factor is in cache
        std::memset(matrix + (i * n + i + 1) * entry, 0, (n - i - 1) * entry);
      }
    } else {
      factor.select(0, k).fill_(0).diagonal().fill_(1);
    }
  }
  return {factor, info};
}

// A (B, rows, cols) operand as BLAS reads it: its matrices with a unit stride along one of their two
// dimensions (a copy where neither has one), the leading dimension, and whether BLAS reads it as
// given ('N') or transposed ('T') when the row-major product is computed as its column-major
// transpose, C^T = B^T A^T.
struct Operand {
  at::Tensor kept;
  char trans;
  int ld;
};

Operand operand(const at::Tensor& X) {
  const int64_t rows = X.size(1), cols = X.size(2);
  if (X.stride(2) == 1 && X.stride(1) >= std::max<int64_t>(cols, 1)) return {X, 'N', static_cast<int>(X.stride(1))};
  if (X.stride(1) == 1 && X.stride(2) >= std::max<int64_t>(rows, 1)) return {X, 'T', static_cast<int>(X.stride(2))};
  at::Tensor copy = X.contiguous();
  return {copy, 'N', static_cast<int>(std::max<int64_t>(cols, 1))};
}

// C + A B for each matrix of a (B, r, d) batch C that `active` (B,) marks, with (B, r, k) A and
// (B, k, d) B, and C itself for the others: BLAS's gemm matrix by matrix (torch's, which its
// batched product calls for each matrix: the same bits), skipping those left out; torch's addmm
// where no gemm routine was handed over.
at::Tensor add_product_where(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, const at::Tensor& active) {
  TORCH_CHECK(C.dim() == 3 && A.dim() == 3 && B.dim() == 3 && A.size(0) == C.size(0) && B.size(0) == C.size(0) &&
                  A.size(1) == C.size(1) && B.size(2) == C.size(2) && A.size(2) == B.size(1),
              "add_product_where: C, A, B must be (B, r, d), (B, r, k), (B, k, d), got ", C.sizes(), ", ", A.sizes(), ", ",
              B.sizes());
  TORCH_CHECK(C.device().is_cpu() && A.device().is_cpu() && B.device().is_cpu(), "add_product_where: the operands must be on the CPU");
  TORCH_CHECK(C.scalar_type() == A.scalar_type() && C.scalar_type() == B.scalar_type(),
              "add_product_where: the operands must have one dtype, got ", C.scalar_type(), ", ", A.scalar_type(), ", ",
              B.scalar_type());
  at::Tensor out = C.clone(at::MemoryFormat::Contiguous);
  at::Tensor kept;
  const bool* on = active_flags(active, C.size(0), kept, "add_product_where");
  const Routines* found = routines_for(C);
  Gemm gemm = found == nullptr ? nullptr : found->gemm;
  int m = static_cast<int>(C.size(2)), n = static_cast<int>(C.size(1)), k = static_cast<int>(A.size(2));
  if (gemm == nullptr || m == 0 || n == 0 || k == 0) {
    for (int64_t b = 0; b < C.size(0); ++b) {
      if (on[b]) out.select(0, b).addmm_(A.select(0, b), B.select(0, b));
    }
    return out;
  }
  Operand a = operand(A), bm = operand(B);
  int ldc = m;
  double one_d = 1.0;
  float one_f = 1.0f;
  void* one = C.scalar_type() == at::kDouble ? static_cast<void*>(&one_d) : static_cast<void*>(&one_f);
  const int64_t size = C.element_size();
  char* a_first = static_cast<char*>(a.kept.data_ptr());
  char* b_first = static_cast<char*>(bm.kept.data_ptr());
  char* c_first = static_cast<char*>(out.data_ptr());
  for (int64_t b = 0; b < C.size(0); ++b) {
    if (!on[b]) continue;
    // C^T (m x n, column-major) = B^T (m x k) A^T (k x n)
    gemm(&bm.trans, &a.trans, &m, &n, &k, one, b_first + b * bm.kept.stride(0) * size, &bm.ld,
         a_first + b * a.kept.stride(0) * size, &a.ld, one, c_first + b * out.stride(0) * size, &ldc);
  }
  return out;
}

// x = L^-1 r (forward), then x = L^-T x (backward), for each row-major lower factor L of the batch.
// Read column-major, L is U = L^T, upper: L y = r is U^T y = r ('U', 'T'), L^T x = y is U x = y
// ('U', 'N'). Each vector is solved in place in the result, matrix by matrix, on the calling thread.
at::Tensor trsv_lower(const at::Tensor& L, const at::Tensor& r, bool forward, bool backward) {
  TORCH_CHECK(L.dim() >= 2 && L.size(-1) == L.size(-2), "trsv_lower: L must be a batch of square matrices, got shape ",
              L.sizes());
  TORCH_CHECK(r.dim() == L.dim() - 1 && r.sizes().slice(0, r.dim() - 1) == L.sizes().slice(0, L.dim() - 2) &&
                  r.size(-1) == L.size(-1),
              "trsv_lower: r must be a (..., n) batch of vectors matching L's (..., n, n), got L ", L.sizes(), " and r ",
              r.sizes());
  TORCH_CHECK(L.device().is_cpu() && r.device().is_cpu(), "trsv_lower: L and r must be on the CPU, got ", L.device(),
              " and ", r.device());
  TORCH_CHECK(L.scalar_type() == r.scalar_type(), "trsv_lower: L and r must have one dtype, got ", L.scalar_type(),
              " and ", r.scalar_type());
  const Routines* found = routines_for(L);
  Trsv routine = found == nullptr ? nullptr : found->trsv;
  TORCH_CHECK(routine != nullptr, "trsv_lower: no trsv routine for dtype ", L.scalar_type(),
              " (float32 and float64, after set_routines)");
  at::Tensor factor = L.contiguous();
  at::Tensor x = r.clone(at::MemoryFormat::Contiguous);
  int n = static_cast<int>(L.size(-1));
  int one = 1;
  char upper = 'U', transposed = 'T', plain = 'N', non_unit = 'N';
  const int64_t count = n == 0 ? 0 : x.numel() / n;
  const int64_t matrix_stride = static_cast<int64_t>(n) * n * factor.element_size();
  const int64_t vector_stride = static_cast<int64_t>(n) * x.element_size();
  char* matrices = static_cast<char*>(factor.data_ptr());
  char* vectors = static_cast<char*>(x.data_ptr());
  for (int64_t k = 0; k < count; ++k) {
    void* a = matrices + k * matrix_stride;
    void* v = vectors + k * vector_stride;
    if (forward) routine(&upper, &transposed, &non_unit, &n, a, &n, v, &one);
    if (backward) routine(&upper, &plain, &non_unit, &n, a, &n, v, &one);
  }
  return x;
}


// The coupled rows' Schur complement of each problem of a batch, and its factor: for a (B, n, n)
// row-major lower factor L of H, the (B, r, n) rows C and the (B, r) mask `coupled` of the rows that
// S couples, Y = L^-1 C^T over the coupled rows (zero columns elsewhere), the lower factor of
// S = Y^T Y + diag(shift) over the coupled rows, with sqrt(shift) on the diagonal of the others
// (rows of C that are zero: S is diagonal there), and LAPACK's info per matrix (an uncoupled row
// with shift <= 0 or NaN reports its position, as potf2 reports a pivot). The coupled rows keep
// their order, so the factor is lower triangular. Per matrix, in a work buffer of the coupled
// rows only: their c rows of C, row-major c x n, read column-major are C_c^T (n x c); trsm with
// U = L^T read column-major solves L Y_c = C_c^T in place; gemm forms Y_c^T Y_c (c x c), the
// shift is added, and potf2 factorises it as cholesky_lower does.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> coupled_schur_typed(const at::Tensor& factor, const at::Tensor& C,
                                                                   const at::Tensor& mask, const at::Tensor& diag,
                                                                   const Routines& found) {
  const int64_t batch = C.size(0), r = C.size(1);
  int n = static_cast<int>(C.size(2));
  at::Tensor Yt = at::zeros({batch, r, n}, C.options());  // Y column-major, as torch's triangular solve gives it
  at::Tensor chol = at::zeros({batch, r, r}, C.options());
  at::Tensor info = at::zeros({batch}, C.options().dtype(at::kInt));
  std::vector<T> work(static_cast<size_t>(r) * n), schur(static_cast<size_t>(r) * r);
  std::vector<int64_t> rows(r);
  const T* l_first = factor.data_ptr<T>();
  const T* c_first = C.data_ptr<T>();
  const bool* on_first = mask.data_ptr<bool>();
  const T* shift_first = diag.data_ptr<T>();
  T* y_first = Yt.data_ptr<T>();
  T* s_first = chol.data_ptr<T>();
  int* reports = info.data_ptr<int>();
  char left = 'L', upper = 'U', transposed = 'T', plain = 'N', non_unit = 'N';
  T one = 1, zero = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const bool* on = on_first + b * r;
    const T* shift = shift_first + b * r;
    const T* c_rows = c_first + b * r * n;
    T* y = y_first + b * r * static_cast<int64_t>(n);
    T* s = s_first + b * r * r;
    int count = 0;
    int first_bad = 0;
    for (int64_t j = 0; j < r; ++j) {
      if (on[j]) {
        rows[count] = j;
        std::copy(c_rows + j * n, c_rows + (j + 1) * n, work.data() + static_cast<int64_t>(count) * n);
        ++count;
      } else {
        s[j * r + j] = std::sqrt(shift[j]);
        if (!(shift[j] > 0) && first_bad == 0) first_bad = static_cast<int>(j) + 1;
      }
    }
    if (count > 0) {
      found.trsm(&left, &upper, &transposed, &non_unit, &n, &count, &one, const_cast<T*>(l_first + b * static_cast<int64_t>(n) * n),
                 &n, work.data(), &n);
      found.gemm(&transposed, &plain, &count, &count, &n, &one, work.data(), &n, work.data(), &n, &zero, schur.data(), &count);
      for (int a = 0; a < count; ++a) schur[static_cast<int64_t>(a) * count + a] += shift[rows[a]];
      int reported = 0;
      found.potf2(&upper, &count, schur.data(), &count, &reported);
      if (reported != 0 && first_bad == 0) first_bad = static_cast<int>(rows[reported - 1]) + 1;
      // Y_c column-major n x c, its column a Y's column rows[a]; the factor, read row-major, is lower
      for (int a = 0; a < count; ++a) {
        const T* column = work.data() + static_cast<int64_t>(a) * n;
        std::copy(column, column + n, y + rows[a] * n);
        for (int e = 0; e <= a; ++e) s[rows[a] * r + rows[e]] = schur[static_cast<int64_t>(a) * count + e];
      }
    }
    reports[b] = first_bad;
  }
  return {Yt.transpose(1, 2), chol, info};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coupled_schur(const at::Tensor& L, const at::Tensor& C, const at::Tensor& coupled,
                                                             const at::Tensor& shift) {
  TORCH_CHECK(L.dim() == 3 && C.dim() == 3 && L.size(1) == L.size(2) && C.size(0) == L.size(0) && C.size(2) == L.size(1),
              "coupled_schur: L and C must be (B, n, n) and (B, r, n), got ", L.sizes(), " and ", C.sizes());
  TORCH_CHECK(coupled.dim() == 2 && shift.dim() == 2 && coupled.size(0) == C.size(0) && coupled.size(1) == C.size(1) &&
                  shift.sizes() == coupled.sizes(),
              "coupled_schur: coupled and shift must be (B, r) for C of shape ", C.sizes(), ", got ", coupled.sizes(), " and ",
              shift.sizes());
  TORCH_CHECK(coupled.scalar_type() == at::kBool, "coupled_schur: coupled must be a bool mask, got ", coupled.scalar_type());
  TORCH_CHECK(L.device().is_cpu() && C.device().is_cpu() && coupled.device().is_cpu() && shift.device().is_cpu(),
              "coupled_schur: the operands must be on the CPU");
  TORCH_CHECK(L.scalar_type() == C.scalar_type() && L.scalar_type() == shift.scalar_type(),
              "coupled_schur: L, C and shift must have one dtype, got ", L.scalar_type(), ", ", C.scalar_type(), ", ",
              shift.scalar_type());
  const Routines* found = routines_for(L);
  TORCH_CHECK(found != nullptr && found->potf2 != nullptr && found->gemm != nullptr && found->trsm != nullptr,
              "coupled_schur: no potf2, gemm and trsm routines for dtype ", L.scalar_type(),
              " (float32 and float64, after set_routines)");
  at::Tensor factor = L.contiguous(), rows = C.contiguous(), mask = coupled.contiguous(), diag = shift.contiguous();
  if (L.scalar_type() == at::kDouble) return coupled_schur_typed<double>(factor, rows, mask, diag, *found);
  return coupled_schur_typed<float>(factor, rows, mask, diag, *found);
}

// The lower Cholesky factor L of each matrix of a (..., n, n) symmetric batch and LAPACK's info per
// matrix, by cholesky_lower, and its inverse L^-1 (lower): trti2 on a copy of
// the factor ('U' read column-major, as the factor's U = L^T: the inverse of U is (L^-1)^T, which
// read row-major is L^-1). A matrix whose factorisation failed gets the identity for an inverse
// (finite wherever it is read; its info reports the failure).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_inverse_lower(const at::Tensor& M) {
  TORCH_CHECK(M.dim() >= 2 && M.size(-1) == M.size(-2), "cholesky_inverse_lower: M must be a batch of square matrices, got shape ",
              M.sizes());
  TORCH_CHECK(M.device().is_cpu(), "cholesky_inverse_lower: M must be on the CPU, got ", M.device());
  const Routines* found = routines_for(M);
  TORCH_CHECK(found != nullptr && found->potf2 != nullptr && found->trti2 != nullptr,
              "cholesky_inverse_lower: no factorisation and trti2 routines for dtype ", M.scalar_type(),
              " (float32 and float64, after set_routines)");
  auto [factor, info] = cholesky_lower(M, c10::nullopt);
  int n = static_cast<int>(M.size(-1));
  const int64_t count = info.numel();
  const int64_t stride = static_cast<int64_t>(n) * n * factor.element_size();
  const int* reports = info.data_ptr<int>();
  char upper = 'U', non_unit = 'N';
  at::Tensor inverse = factor.clone();
  char* inverses = static_cast<char*>(inverse.data_ptr());
  for (int64_t k = 0; k < count; ++k) {
    if (reports[k] != 0) {
      inverse.view({count, n, n}).select(0, k).fill_(0).diagonal().fill_(1);
      continue;
    }
    int reported = 0;
    found->trti2(&upper, &non_unit, &n, inverses + k * stride, &n, &reported);
  }
  return {factor, inverse, info};
}

}  // namespace

TORCH_LIBRARY(optlayers_lapack, m) {
  m.def("set_routines(int double_potf2, int float_potf2, int double_trsv, int float_trsv, int double_gemm, int float_gemm, "
        "int double_trsm, int float_trsm, int double_trti2, int float_trti2) -> ()",
        &set_routines);
  m.def("cholesky_lower(Tensor M, Tensor? active=None) -> (Tensor, Tensor)");
  m.def("trsv_lower(Tensor L, Tensor r, bool forward, bool backward) -> Tensor");
  m.def("add_product_where(Tensor C, Tensor A, Tensor B, Tensor active) -> Tensor");
  m.def("coupled_schur(Tensor L, Tensor C, Tensor coupled, Tensor shift) -> (Tensor, Tensor, Tensor)");
  m.def("cholesky_inverse_lower(Tensor M) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(optlayers_lapack, CPU, m) {
  m.impl("cholesky_lower", &cholesky_lower);
  m.impl("trsv_lower", &trsv_lower);
  m.impl("add_product_where", &add_product_where);
  m.impl("coupled_schur", &coupled_schur);
  m.impl("cholesky_inverse_lower", &cholesky_inverse_lower);
}
