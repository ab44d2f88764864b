// The operator optlayers_potf2::potf2_lower, which compiled solves call for their Cholesky
// factorisations on the CPU where engine/lapack.py chooses LAPACK's potf2 (see that module):
// the lower factor of each matrix of a (..., n, n) symmetric batch, with LAPACK's info per matrix.
// The routines are scipy's, whose addresses lapack.py hands over once (set_routines): this file
// links against nothing but torch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace {

// LAPACK's xPOTF2(UPLO, N, A, LDA, INFO), for float and double alike (A by address).
using Potf2 = void (*)(char*, int*, void*, int*, int*);

Potf2 double_routine = nullptr;
Potf2 float_routine = nullptr;

void set_routines(int64_t double_address, int64_t float_address) {
  double_routine = reinterpret_cast<Potf2>(double_address);
  float_routine = reinterpret_cast<Potf2>(float_address);
}

// A row-major symmetric matrix read column-major is itself, and LAPACK's upper factor U of it,
// read row-major, is the lower factor L = U^T: so 'U' on the row-major copy, then its upper
// triangle zeroed.
std::tuple<at::Tensor, at::Tensor> potf2_lower(const at::Tensor& M) {
  TORCH_CHECK(M.dim() >= 2 && M.size(-1) == M.size(-2), "potf2_lower: M must be a batch of square matrices, got shape ",
              M.sizes());
  TORCH_CHECK(M.device().is_cpu(), "potf2_lower: M must be on the CPU, got ", M.device());
  Potf2 routine = M.scalar_type() == at::kDouble ? double_routine : M.scalar_type() == at::kFloat ? float_routine : nullptr;
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

}  // namespace

TORCH_LIBRARY(optlayers_potf2, m) {
  m.def("set_routines(int double_address, int float_address) -> ()", &set_routines);
  m.def("potf2_lower(Tensor M) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(optlayers_potf2, CPU, m) {
  m.impl("potf2_lower", &potf2_lower);
}
