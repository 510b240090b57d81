// denoise_step on the CPU: the final denoising x0 = x_bar - gamma_next eps, one pass.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "step_common.h"

namespace genie_fast {
namespace {

constexpr int64_t kGrain = 16384;

template <typename state_t, typename net_t>
void denoise_step_kernel(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs, at::Tensor& x0) {
  using op_t = state_t;
  const at::Tensor c64 = coeffs.to(at::kDouble);
  const StepCoeffs<op_t> k = load_coeffs<op_t>(c64.data_ptr<double>(), c64.stride(0));
  const state_t* xb = x_bar.data_ptr<state_t>();
  const net_t* e = eps.data_ptr<net_t>();
  state_t* out = x0.data_ptr<state_t>();
  at::parallel_for(0, x_bar.numel(), kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) out[j] = state_t(denoise_x0<op_t>(op_t(xb[j]), op_t(e[j]), k));
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
