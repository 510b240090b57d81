// dpmpp_2m_step on the CPU: DPM-Solver++(2M) in x_bar, one pass writing x_bar_next, the next
// network input and this step's x0 (the next step's x0_prev).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "step_common.h"

namespace genie_fast {
namespace {

constexpr int64_t kGrain = 16384;

template <typename state_t, typename net_t>
void dpmpp_2m_step_kernel(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& x0_prev,
                          const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next, at::Tensor& x0) {
  using op_t = state_t;
  const at::Tensor c64 = coeffs.to(at::kDouble);
  const StepCoeffs<op_t> k = load_coeffs<op_t>(c64.data_ptr<double>(), c64.stride(0));
  const state_t* xb = x_bar.data_ptr<state_t>();
  const net_t* e = eps.data_ptr<net_t>();
  const state_t* xp = x0_prev.data_ptr<state_t>();
  state_t* xb_out = x_bar_next.data_ptr<state_t>();
  net_t* x_out = x_next.data_ptr<net_t>();
  state_t* x0_out = x0.data_ptr<state_t>();
  at::parallel_for(0, x_bar.numel(), kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      const op_t xbj = op_t(xb[j]);
      const op_t d0 = dpmpp_x0<op_t>(xbj, op_t(e[j]), k);
      const op_t v = dpmpp_x_bar_next<op_t>(xbj, d0, op_t(xp[j]), k);
      x0_out[j] = state_t(d0);
      xb_out[j] = state_t(v);
      x_out[j] = net_t(v * k.inv_scale_next);
    }
  });
}

void dpmpp_2m_step_out_cpu(const at::Tensor& x_bar_in, const at::Tensor& eps_in, const at::Tensor& x0_prev_in,
                           const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next, at::Tensor& x0) {
  check_dpmpp_2m_step(x_bar_in, eps_in, x0_prev_in, coeffs, x_bar_next, x_next, x0);
  if (x_bar_in.numel() == 0) return;
  const at::Tensor x_bar = x_bar_in.contiguous(), eps = eps_in.contiguous(), x0_prev = x0_prev_in.contiguous();
  dispatch_state_net(x_bar, eps, "dpmpp_2m_step_cpu", [&](auto s, auto n) {
    dpmpp_2m_step_kernel<decltype(s), decltype(n)>(x_bar, eps, x0_prev, coeffs, x_bar_next, x_next, x0);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpmpp_2m_step_cpu(const at::Tensor& x_bar, const at::Tensor& eps,
                                                                 const at::Tensor& x0_prev, const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar);
  at::Tensor x_next = empty_contiguous(eps);
  at::Tensor x0 = empty_contiguous(x_bar);
  dpmpp_2m_step_out_cpu(x_bar, eps, x0_prev, coeffs, x_bar_next, x_next, x0);
  return {x_bar_next, x_next, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("dpmpp_2m_step", &dpmpp_2m_step_cpu);
  m.impl("dpmpp_2m_step_out", &dpmpp_2m_step_out_cpu);
}

}  // namespace genie_fast
