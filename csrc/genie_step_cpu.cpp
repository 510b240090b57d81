// genie_step on the CPU: one pass over memory, at::parallel_for (OpenMP) over the flat index,
// a SIMD inner loop per sample (the head's h1, h2, h3 rows of a sample are contiguous runs),
// compiled for the baseline ISA and for AVX2+FMA (picked at run time).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "step_common.h"

namespace genie_fast {
namespace {

constexpr int64_t kGrain = 16384;

template <typename state_t, typename net_t>
struct GenieArgs {
  const state_t* xb;
  const net_t* e;
  const net_t* hd;
  state_t* xb_out;
  net_t* x_out;
  int64_t per_sample;  // C * H * W
  StepCoeffs<state_t> k;
};

template <typename state_t, typename net_t>
GF_ALWAYS_INLINE void genie_rows(const GenieArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  using op_t = state_t;  // float32 math for a float32 state, float64 for float64
  const StepCoeffs<op_t> k = a.k;
  const int64_t per_sample = a.per_sample;
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / per_sample;
    const int64_t stop = std::min(end, (b + 1) * per_sample);
    // head rows of sample b: h1 at [3b*CHW, ...), h2 one CHW later, h3 two later
    const net_t* h1 = a.hd + 2 * b * per_sample;
    const net_t* h2 = h1 + per_sample;
    const net_t* h3 = h2 + per_sample;
#pragma omp simd
    for (int64_t j = i; j < stop; ++j) {
      const op_t v = genie_x_bar_next<op_t>(op_t(a.xb[j]), op_t(a.e[j]), op_t(h1[j]), op_t(h2[j]), op_t(h3[j]), k);
      a.xb_out[j] = state_t(v);
      a.x_out[j] = net_t(v * k.inv_scale_next);
    }
    i = stop;
  }
}

template <typename state_t, typename net_t>
GF_TARGET_AVX2 void genie_rows_avx2(const GenieArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  genie_rows(a, begin, end);
}

template <typename state_t, typename net_t>
void genie_rows_base(const GenieArgs<state_t, net_t>& a, int64_t begin, int64_t end) {
  genie_rows(a, begin, end);
}

template <typename state_t, typename net_t>
void genie_step_kernel(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& head_out,
                       const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next) {
  const at::Tensor c64 = coeffs.to(at::kDouble);
  const GenieArgs<state_t, net_t> a{x_bar.data_ptr<state_t>(), eps.data_ptr<net_t>(), head_out.data_ptr<net_t>(),
                                    x_bar_next.data_ptr<state_t>(), x_next.data_ptr<net_t>(),
                                    x_bar.numel() / x_bar.size(0),
                                    load_coeffs<state_t>(c64.data_ptr<double>(), c64.stride(0))};
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, x_bar.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      genie_rows_avx2(a, begin, end);
    } else {
      genie_rows_base(a, begin, end);
    }
  });
}

void genie_step_out_cpu(const at::Tensor& x_bar_in, const at::Tensor& eps_in, const at::Tensor& head_in,
                        const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next) {
  check_genie_step(x_bar_in, eps_in, head_in, coeffs, x_bar_next, x_next);
  if (x_bar_in.numel() == 0) return;
  // Strided or channels_last inputs are handled by one contiguous copy.
  const at::Tensor x_bar = x_bar_in.contiguous(), eps = eps_in.contiguous(), head_out = head_in.contiguous();
  dispatch_state_net(x_bar, eps, "genie_step_cpu", [&](auto s, auto n) {
    genie_step_kernel<decltype(s), decltype(n)>(x_bar, eps, head_out, coeffs, x_bar_next, x_next);
  });
}

std::tuple<at::Tensor, at::Tensor> genie_step_cpu(const at::Tensor& x_bar, const at::Tensor& eps,
                                                  const at::Tensor& head_out, const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar);
  at::Tensor x_next = empty_contiguous(eps);
  genie_step_out_cpu(x_bar, eps, head_out, coeffs, x_bar_next, x_next);
  return {x_bar_next, x_next};
}

}  // namespace

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("genie_step", &genie_step_cpu);
  m.impl("genie_step_out", &genie_step_out_cpu);
}

}  // namespace genie_fast
