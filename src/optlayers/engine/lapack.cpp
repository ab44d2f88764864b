// The operators optlayers_lapack::potf2_lower and optlayers_lapack::trsv_lower, which compiled
// solves call on the CPU where engine/lapack.py chooses scipy's LAPACK and BLAS (see that module):
// the lower Cholesky factor of each matrix of a (..., n, n) symmetric batch, with LAPACK's info per
// matrix, and the triangular solves with such factors of a (..., n) batch of vectors. The routines
// are scipy's, whose addresses lapack.py hands over once (set_routines): this file links against
// nothing but torch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace {

// LAPACK's xPOTF2(UPLO, N, A, LDA, INFO) and BLAS's xTRSV(UPLO, TRANS, DIAG, N, A, LDA, X, INCX),
// for float and double alike (arrays by address).
using Potf2 = void (*)(char*, int*, void*, int*, int*);
using Trsv = void (*)(char*, char*, char*, int*, void*, int*, void*, int*);

struct Routines {
  Potf2 potf2 = nullptr;
  Trsv trsv = nullptr;
};

Routines doubles;
Routines floats;

void set_routines(int64_t double_potf2, int64_t float_potf2, int64_t double_trsv, int64_t float_trsv) {
  doubles = {reinterpret_cast<Potf2>(double_potf2), reinterpret_cast<Trsv>(double_trsv)};
  floats = {reinterpret_cast<Potf2>(float_potf2), reinterpret_cast<Trsv>(float_trsv)};
}

const Routines* routines_for(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? &doubles : t.scalar_type() == at::kFloat ? &floats : nullptr;
}

// A row-major symmetric matrix read column-major is itself, and LAPACK's upper factor U of it,
// read row-major, is the lower factor L = U^T: so 'U' on the row-major copy, then its upper
// triangle zeroed.
std::tuple<at::Tensor, at::Tensor> potf2_lower(const at::Tensor& M) {
  TORCH_CHECK(M.dim() >= 2 && M.size(-1) == M.size(-2), "potf2_lower: M must be a batch of square matrices, got shape ",
              M.sizes());
  TORCH_CHECK(M.device().is_cpu(), "potf2_lower: M must be on the CPU, got ", M.device());
  const Routines* found = routines_for(M);
  Potf2 routine = found == nullptr ? nullptr : found->potf2;
  TORCH_CHECK(routine != nullptr, "potf2_lower: no potf2 routine for dtype ", M.scalar_type(),
              " (float32 and float64, after set_routines)");
  at::Tensor factor = M.clone(at::MemoryFormat::Contiguous);
  int n = static_cast<int>(M.size(-1));
  at::Tensor info = at::zeros(M.sizes().slice(0, M.dim() - 2), M.options().dtype(at::kInt));
  char upper = 'U';
  const int64_t count = info.numel();
  const int64_t stride = static_cast<int64_t>(n) * n * factor.element_size();
  char* first = static_cast<char*>(factor.data_ptr());
  int* reports = info.data_ptr<int>();
  for (int64_t k = 0; k < count; ++k) {
    routine(&upper, &n, first + k * stride, &n, reports + k);
  }
  factor.tril_();
  return {factor, info};
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

}  // namespace

TORCH_LIBRARY(optlayers_lapack, m) {
  m.def("set_routines(int double_potf2, int float_potf2, int double_trsv, int float_trsv) -> ()", &set_routines);
  m.def("potf2_lower(Tensor M) -> (Tensor, Tensor)");
  m.def("trsv_lower(Tensor L, Tensor r, bool forward, bool backward) -> Tensor");
}

TORCH_LIBRARY_IMPL(optlayers_lapack, CPU, m) {
  m.impl("potf2_lower", &potf2_lower);
  m.impl("trsv_lower", &trsv_lower);
}
