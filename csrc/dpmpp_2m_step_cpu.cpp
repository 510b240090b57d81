// dpmpp_2m_step on the CPU: DPM-Solver++(2M) in x_bar, one pass writing x_bar_next, the next
// network input and this step's x0 (the next step's x0_prev); baseline and AVX2+FMA builds.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "step_common.h"

namespace genie_fast {
namespace {

constexpr int64_t kGrain = 16384;

template <typename state_t, typename net_t>
struct DpmArgs {
  const state_t* xb;
  const net_t* e;
  const state_t* xp;
  state_t* xb_out;
  net_t* x_out;
  state_t* x0_out;
  StepCoeffs<state_t> k;
};

template <typename state_t, typename net_t>
GF_ALWAYS_INLINE void dpmpp_rows(const DpmArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  using op_t = state_t;
  const StepCoeffs<op_t> k = a.k;
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const op_t xbj = op_t(a.xb[j]);
    const op_t d0 = dpmpp_x0<op_t>(xbj, op_t(a.e[j]), k);
    const op_t v = dpmpp_x_bar_next<op_t>(xbj, d0, op_t(a.xp[j]), k);
    a.x0_out[j] = state_t(d0);
    a.xb_out[j] = state_t(v);
    a.x_out[j] = net_t(v * k.inv_scale_next);
  }
}

template <typename state_t, typename net_t>
GF_TARGET_AVX2 void dpmpp_rows_avx2(const DpmArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  dpmpp_rows(a, begin, end);
}

template <typename state_t, typename net_t>
void dpmpp_rows_base(const DpmArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  dpmpp_rows(a, begin, end);
}

template <typename state_t, typename net_t>
void dpmpp_2m_step_kernel(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& x0_prev,
                          const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next, at::Tensor& x0) {
  const at::Tensor c64 = coeffs.to(at::kDouble);
  const DpmArgs<state_t, net_t> a{x_bar.data_ptr<state_t>(), eps.data_ptr<net_t>(), x0_prev.data_ptr<state_t>(),
                                  x_bar_next.data_ptr<state_t>(), x_next.data_ptr<net_t>(), x0.data_ptr<state_t>(),
                                  load_coeffs<state_t>(c64.data_ptr<double>(), c64.stride(0))};
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, x_bar.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      dpmpp_rows_avx2(a, begin, end);
    } else {
      dpmpp_rows_base(a, begin, end);
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
