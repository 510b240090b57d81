// denoise_step on CUDA: x0 = x_bar - gamma_next eps, one pass, grid-stride, vector loads.
#include <torch/library.h>

#include "step_cuda.cuh"

namespace genie_fast {
namespace cuda {
namespace {

template <typename state_t, typename net_t, typename coef_t, int VEC>
__global__ void denoise_step_kernel(const state_t* xb, const net_t* e, const coef_t* c, int64_t cs, state_t* x0,
                                    int64_t n) {
  using op_t = state_t;
  const StepCoeffs<op_t> k = load_coeffs<op_t>(c, cs);
  const int64_t n_vec = n / VEC;
  for (int64_t v = global_thread(); v < n_vec; v += grid_threads()) {
    const int64_t i = v * VEC;
    const auto xv = load_vec<VEC>(xb + i);
    const auto ev = load_vec<VEC>(e + i);
    Vec<state_t, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = state_t(denoise_x0<op_t>(op_t(xv.v[j]), op_t(ev.v[j]), k));
    store_vec<VEC>(x0 + i, out);
  }
  for (int64_t i = n_vec * VEC + global_thread(); i < n; i += grid_threads()) {
    x0[i] = state_t(denoise_x0<op_t>(op_t(xb[i]), op_t(e[i]), k));
  }
}

void denoise_step_out_cuda(const at::Tensor& x_bar_in, const at::Tensor& eps_in, const at::Tensor& coeffs,
                           at::Tensor& x0) {
  check_denoise_step(x_bar_in, eps_in, coeffs, x0);
  if (x_bar_in.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x_bar_in.device());
  const at::Tensor x_bar = x_bar_in.contiguous(), eps = eps_in.contiguous();
  const int64_t n = x_bar.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_state_net(x_bar, eps, "denoise_step_cuda", [&](auto s, auto nt) {
    using state_t = decltype(s);
    using net_t = decltype(nt);
    dispatch_coeffs(coeffs, [&](auto ct) {
      using coef_t = decltype(ct);
      const state_t* xb = x_bar.data_ptr<state_t>();
      const net_t* e = eps.data_ptr<net_t>();
      state_t* xo = x0.data_ptr<state_t>();
      const coef_t* c = coeffs.data_ptr<coef_t>();
      if (vec_aligned(xb) && vec_aligned(e) && vec_aligned(xo)) {
        denoise_step_kernel<state_t, net_t, coef_t, kVec><<<num_blocks(n / kVec), kThreads, 0, stream>>>(
            xb, e, c, coeffs.stride(0), xo, n);
      } else {
        denoise_step_kernel<state_t, net_t, coef_t, 1><<<num_blocks(n), kThreads, 0, stream>>>(
            xb, e, c, coeffs.stride(0), xo, n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor denoise_step_cuda(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs) {
  at::Tensor x0 = empty_contiguous(x_bar);
  denoise_step_out_cuda(x_bar, eps, coeffs, x0);
  return x0;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) {
  m.impl("denoise_step", &cuda::denoise_step_cuda);
  m.impl("denoise_step_out", &cuda::denoise_step_out_cuda);
}

}  // namespace genie_fast
