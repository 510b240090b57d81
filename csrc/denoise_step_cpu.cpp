// denoise_step on the CPU: the final denoising x0 = x_bar - gamma_next eps, one pass
// (baseline and AVX2+FMA builds of the loop).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "step_common.h"

namespace genie_fast {
namespace {

constexpr int64_t kGrain = 16384;

template <typename state_t, typename net_t>
struct DenoiseArgs {
  const state_t* xb;
  const net_t* e;
  state_t* x0;
  StepCoeffs<state_t> k;
};

template <typename state_t, typename net_t>
GF_ALWAYS_INLINE void denoise_rows(const DenoiseArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  using op_t = state_t;
  const StepCoeffs<op_t> k = a.k;
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) a.x0[j] = state_t(denoise_x0<op_t>(op_t(a.xb[j]), op_t(a.e[j]), k));
}

template <typename state_t, typename net_t>
GF_TARGET_AVX2 void denoise_rows_avx2(const DenoiseArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  denoise_rows(a, begin, end);
}

template <typename state_t, typename net_t>
void denoise_rows_base(const DenoiseArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  denoise_rows(a, begin, end);
}

template <typename state_t, typename net_t>
void denoise_step_kernel(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs, at::Tensor& x0) {
  const at::Tensor c64 = coeffs.to(at::kDouble);
  const DenoiseArgs<state_t, net_t> a{x_bar.data_ptr<state_t>(), eps.data_ptr<net_t>(), x0.data_ptr<state_t>(),
                                      load_coeffs<state_t>(c64.data_ptr<double>(), c64.stride(0))};
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, x_bar.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      denoise_rows_avx2(a, begin, end);
    } else {
      denoise_rows_base(a, begin, end);
    }
  });
}

void denoise_step_out_cpu(const at::Tensor& x_bar_in, const at::Tensor& eps_in, const at::Tensor& coeffs,
                          at::Tensor& x0) {
  check_denoise_step(x_bar_in, eps_in, coeffs, x0);
  if (x_bar_in.numel() == 0) return;
  const at::Tensor x_bar = x_bar_in.contiguous(), eps = eps_in.contiguous();
  dispatch_state_net(x_bar, eps, "denoise_step_cpu", [&](auto s, auto n) {
    denoise_step_kernel<decltype(s), decltype(n)>(x_bar, eps, coeffs, x0);
  });
}

at::Tensor denoise_step_cpu(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs) {
  at::Tensor x0 = empty_contiguous(x_bar);
  denoise_step_out_cpu(x_bar, eps, coeffs, x0);
  return x0;
}

}  // namespace

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("denoise_step", &denoise_step_cpu);
  m.impl("denoise_step_out", &denoise_step_out_cpu);
}

}  // namespace genie_fast
