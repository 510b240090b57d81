// ddim_step on CUDA (DDIM = Euler in gamma; AFS first step with eps = x_T): one pass,
// grid-stride, 4-wide vector loads when the pointers allow.
#include <torch/library.h>

#include <tuple>

#include "step_cuda.cuh"

namespace genie_fast {
namespace cuda {
namespace {

template <typename state_t, typename net_t, typename coef_t, int VEC>
__global__ void ddim_step_kernel(const state_t* xb, const net_t* e, const coef_t* c, int64_t cs, state_t* xb_out,
                                 net_t* x_out, int64_t n) {
  using op_t = state_t;
  const StepCoeffs<op_t> k = load_coeffs<op_t>(c, cs);
  const int64_t n_vec = n / VEC;
  for (int64_t v = global_thread(); v < n_vec; v += grid_threads()) {
    const int64_t i = v * VEC;
    const auto xv = load_vec<VEC>(xb + i);
    const auto ev = load_vec<VEC>(e + i);
    Vec<state_t, VEC> out_state;
    Vec<net_t, VEC> out_net;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const op_t val = ddim_x_bar_next<op_t>(op_t(xv.v[j]), op_t(ev.v[j]), k);
      out_state.v[j] = state_t(val);
      out_net.v[j] = net_t(val * k.inv_scale_next);
    }
    store_vec<VEC>(xb_out + i, out_state);
    store_vec<VEC>(x_out + i, out_net);
  }
  for (int64_t i = n_vec * VEC + global_thread(); i < n; i += grid_threads()) {
    const op_t val = ddim_x_bar_next<op_t>(op_t(xb[i]), op_t(e[i]), k);
    xb_out[i] = state_t(val);
    x_out[i] = net_t(val * k.inv_scale_next);
  }
}

void ddim_step_out_cuda(const at::Tensor& x_bar_in, const at::Tensor& eps_in, const at::Tensor& coeffs,
                        at::Tensor& x_bar_next, at::Tensor& x_next) {
  check_ddim_step(x_bar_in, eps_in, coeffs, x_bar_next, x_next);
  if (x_bar_in.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x_bar_in.device());
  const at::Tensor x_bar = x_bar_in.contiguous(), eps = eps_in.contiguous();
  const int64_t n = x_bar.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_state_net(x_bar, eps, "ddim_step_cuda", [&](auto s, auto nt) {
    using state_t = decltype(s);
    using net_t = decltype(nt);
    dispatch_coeffs(coeffs, [&](auto ct) {
      using coef_t = decltype(ct);
      const state_t* xb = x_bar.data_ptr<state_t>();
      const net_t* e = eps.data_ptr<net_t>();
      state_t* xo = x_bar_next.data_ptr<state_t>();
      net_t* no = x_next.data_ptr<net_t>();
      const coef_t* c = coeffs.data_ptr<coef_t>();
      if (vec_aligned(xb) && vec_aligned(e) && vec_aligned(xo) && vec_aligned(no)) {
        ddim_step_kernel<state_t, net_t, coef_t, kVec><<<num_blocks(n / kVec), kThreads, 0, stream>>>(
            xb, e, c, coeffs.stride(0), xo, no, n);
      } else {
        ddim_step_kernel<state_t, net_t, coef_t, 1><<<num_blocks(n), kThreads, 0, stream>>>(
            xb, e, c, coeffs.stride(0), xo, no, n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(const at::Tensor& x_bar, const at::Tensor& eps,
                                                  const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar), x_next = empty_contiguous(eps);
  ddim_step_out_cuda(x_bar, eps, coeffs, x_bar_next, x_next);
  return {x_bar_next, x_next};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) {
  m.impl("ddim_step", &cuda::ddim_step_cuda);
  m.impl("ddim_step_out", &cuda::ddim_step_out_cuda);
}

}  // namespace genie_fast
