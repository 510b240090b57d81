// denoise_step on CUDA: x0 = x_bar - gamma_next eps, one pass, grid-stride, vector loads.
#include <torch/library.h>

#include "step_cuda.cuh"

namespace genie_fast {
namespace cuda {
namespace {

template <typename state_t, typename net_t>
__global__ void denoise_step_kernel(const state_t* xb, const net_t* e, CoeffRow c, state_t* x0, int64_t n,
                                    bool vec) {
  using op_t = state_t;
  const StepCoeffs<op_t> k = load_coeffs<op_t>(c);
  const int64_t n_vec = vec ? n / kVec : 0;
  for (int64_t v = global_thread(); v < n_vec; v += grid_threads()) {
    const int64_t i = v * kVec;
    const auto xv = load_vec<kVec>(xb + i);
    const auto ev = load_vec<kVec>(e + i);
    Vec<state_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) out.v[j] = state_t(denoise_x0<op_t>(op_t(xv.v[j]), op_t(ev.v[j]), k));
    store_vec<kVec>(x0 + i, out);
  }
  for (int64_t i = n_vec * kVec + global_thread(); i < n; i += grid_threads()) {
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
    const state_t* xb = x_bar.data_ptr<state_t>();
    const net_t* e = eps.data_ptr<net_t>();
    state_t* xo = x0.data_ptr<state_t>();
    const bool vec = vec_aligned(xb) && vec_aligned(e) && vec_aligned(xo);
    denoise_step_kernel<state_t, net_t><<<num_blocks(vec ? n / kVec : n), kThreads, 0, stream>>>(
        xb, e, coeff_row(coeffs), xo, n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
