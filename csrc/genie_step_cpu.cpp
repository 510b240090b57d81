// genie_step on the CPU: one pass over memory, OpenMP over the flat index, SIMD inner loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "step_common.h"

namespace genie_fast {
namespace {

template <typename state_t, typename net_t>
void genie_step_kernel(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& head_out,
                       const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next) {
  using opmath_t = state_t;  // float32 math for a float32 state, float64 for float64
  const at::Tensor c64 = coeffs.to(at::kDouble);
  const double* c = c64.data_ptr<double>();
  const opmath_t h = c[kH], half_h2 = c[kHalfH2], w1 = c[kW1], w2 = c[kW2], w3 = c[kW3];
  const opmath_t inv_scale_next = c[kInvScaleNext];

  const state_t* xb = x_bar.data_ptr<state_t>();
  const net_t* e = eps.data_ptr<net_t>();
  const net_t* hd = head_out.data_ptr<net_t>();
  state_t* xb_out = x_bar_next.data_ptr<state_t>();
  net_t* x_out = x_next.data_ptr<net_t>();
  const int64_t per_sample = x_bar.numel() / x_bar.size(0);  // C * H * W

  at::parallel_for(0, x_bar.numel(), 16384, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / per_sample;
      const int64_t stop = std::min(end, (b + 1) * per_sample);
      // head rows of sample b: h1 at [3b*CHW, ...), h2 one CHW later, h3 two later
      const net_t* h1 = hd + 2 * b * per_sample;
      const net_t* h2 = h1 + per_sample;
      const net_t* h3 = h2 + per_sample;
#pragma omp simd
      for (int64_t k = i; k < stop; ++k) {
        const opmath_t deps = w1 * opmath_t(h1[k]) + w2 * opmath_t(h2[k]) + w3 * opmath_t(h3[k]);
        const opmath_t v = opmath_t(xb[k]) + h * opmath_t(e[k]) + half_h2 * deps;
        xb_out[k] = state_t(v);
        x_out[k] = net_t(v * inv_scale_next);
      }
      i = stop;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> genie_step_cpu(const at::Tensor& x_bar_in, const at::Tensor& eps_in,
                                                  const at::Tensor& head_in, const at::Tensor& coeffs) {
  check_state_and_eps(x_bar_in, eps_in);
  check_head(x_bar_in, eps_in, head_in);
  check_coeffs(coeffs, x_bar_in);
  // Strided or channels_last inputs are handled by one contiguous copy.
  const at::Tensor x_bar = x_bar_in.contiguous(), eps = eps_in.contiguous(), head_out = head_in.contiguous();
  at::Tensor x_bar_next = at::empty_like(x_bar);
  at::Tensor x_next = at::empty_like(eps);
  if (x_bar.numel() == 0) return {x_bar_next, x_next};

  if (x_bar.scalar_type() == at::kDouble) {
    genie_step_kernel<double, double>(x_bar, eps, head_out, coeffs, x_bar_next, x_next);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps.scalar_type(), "genie_step_cpu", [&] {
      genie_step_kernel<float, scalar_t>(x_bar, eps, head_out, coeffs, x_bar_next, x_next);
    });
  }
  return {x_bar_next, x_next};
}

}  // namespace

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) { m.impl("genie_step", &genie_step_cpu); }

}  // namespace genie_fast
