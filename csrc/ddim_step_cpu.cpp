// ddim_step on the CPU (DDIM = Euler in gamma; the AFS first step with eps = x_T): one pass,
// at::parallel_for over the flat index, SIMD inner loop (baseline and AVX2+FMA builds).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "step_common.h"

namespace genie_fast {
namespace {

constexpr int64_t kGrain = 16384;

template <typename state_t, typename net_t>
struct DdimArgs {
  const state_t* xb;
  const net_t* e;
  state_t* xb_out;
  net_t* x_out;
  StepCoeffs<state_t> k;
};

template <typename state_t, typename net_t>
GF_ALWAYS_INLINE void ddim_rows(const DdimArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  using op_t = state_t;
  const StepCoeffs<op_t> k = a.k;
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const op_t v = ddim_x_bar_next<op_t>(op_t(a.xb[j]), op_t(a.e[j]), k);
    a.xb_out[j] = state_t(v);
    a.x_out[j] = net_t(v * k.inv_scale_next);
  }
}

template <typename state_t, typename net_t>
GF_TARGET_AVX2 void ddim_rows_avx2(const DdimArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  ddim_rows(a, begin, end);
}

template <typename state_t, typename net_t>
void ddim_rows_base(const DdimArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  ddim_rows(a, begin, end);
}

template <typename state_t, typename net_t>
void ddim_step_kernel(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs,
                      at::Tensor& x_bar_next, at::Tensor& x_next) {
  const at::Tensor c64 = coeffs.to(at::kDouble);
  const DdimArgs<state_t, net_t> a{x_bar.data_ptr<state_t>(), eps.data_ptr<net_t>(), x_bar_next.data_ptr<state_t>(),
                                   x_next.data_ptr<net_t>(),
                                   load_coeffs<state_t>(c64.data_ptr<double>(), c64.stride(0))};
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, x_bar.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      ddim_rows_avx2(a, begin, end);
    } else {
      ddim_rows_base(a, begin, end);
    }
  });
}

void ddim_step_out_cpu(const at::Tensor& x_bar_in, const at::Tensor& eps_in, const at::Tensor& coeffs,
                       at::Tensor& x_bar_next, at::Tensor& x_next) {
  check_ddim_step(x_bar_in, eps_in, coeffs, x_bar_next, x_next);
  if (x_bar_in.numel() == 0) return;
  const at::Tensor x_bar = x_bar_in.contiguous(), eps = eps_in.contiguous();
  dispatch_state_net(x_bar, eps, "ddim_step_cpu", [&](auto s, auto n) {
    ddim_step_kernel<decltype(s), decltype(n)>(x_bar, eps, coeffs, x_bar_next, x_next);
  });
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& x_bar, const at::Tensor& eps,
                                                 const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar);
  at::Tensor x_next = empty_contiguous(eps);
  ddim_step_out_cpu(x_bar, eps, coeffs, x_bar_next, x_next);
  return {x_bar_next, x_next};
}

}  // namespace

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("ddim_step", &ddim_step_cpu);
  m.impl("ddim_step_out", &ddim_step_out_cpu);
}

}  // namespace genie_fast
