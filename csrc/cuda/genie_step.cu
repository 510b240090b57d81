// genie_step on CUDA: one pass, grid-stride, 4-wide vector loads when every pointer is aligned
// and C*H*W is a multiple of 4 (so a vector never straddles two samples' head rows).
#include <torch/library.h>

#include <tuple>

#include "step_cuda.cuh"

namespace genie_fast {
namespace cuda {
namespace {

template <typename state_t, typename net_t>
__global__ void genie_step_kernel(const state_t* xb, const net_t* e, const net_t* hd, CoeffRow c,
                                  state_t* xb_out, net_t* x_out, int64_t n, int64_t per_sample, bool vec) {
  using op_t = state_t;
  const StepCoeffs<op_t> k = load_coeffs<op_t>(c);
  const int64_t n_vec = vec ? n / kVec : 0;
  for (int64_t v = global_thread(); v < n_vec; v += grid_threads()) {
    const int64_t i = v * kVec;
    const int64_t b = i / per_sample;
    const net_t* h1 = hd + i + 2 * b * per_sample;  // h1 of sample b sits at 3b*CHW + (i - b*CHW)
    const auto xv = load_vec<kVec>(xb + i);
    const auto ev = load_vec<kVec>(e + i);
    const auto h1v = load_vec<kVec>(h1);
    const auto h2v = load_vec<kVec>(h1 + per_sample);
    const auto h3v = load_vec<kVec>(h1 + 2 * per_sample);
    Vec<state_t, kVec> out_state;
    Vec<net_t, kVec> out_net;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const op_t val = genie_x_bar_next<op_t>(op_t(xv.v[j]), op_t(ev.v[j]), op_t(h1v.v[j]), op_t(h2v.v[j]),
                                              op_t(h3v.v[j]), k);
      out_state.v[j] = state_t(val);
      out_net.v[j] = net_t(val * k.inv_scale_next);
    }
    store_vec<kVec>(xb_out + i, out_state);
    store_vec<kVec>(x_out + i, out_net);
  }
  for (int64_t i = n_vec * kVec + global_thread(); i < n; i += grid_threads()) {
    const int64_t b = i / per_sample;
    const net_t* h1 = hd + i + 2 * b * per_sample;
    const op_t val = genie_x_bar_next<op_t>(op_t(xb[i]), op_t(e[i]), op_t(h1[0]), op_t(h1[per_sample]),
                                            op_t(h1[2 * per_sample]), k);
    xb_out[i] = state_t(val);
    x_out[i] = net_t(val * k.inv_scale_next);
  }
}

void genie_step_out_cuda(const at::Tensor& x_bar_in, const at::Tensor& eps_in, const at::Tensor& head_in,
                         const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next) {
  check_genie_step(x_bar_in, eps_in, head_in, coeffs, x_bar_next, x_next);
  if (x_bar_in.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x_bar_in.device());
  const at::Tensor x_bar = x_bar_in.contiguous(), eps = eps_in.contiguous(), head_out = head_in.contiguous();
  const int64_t n = x_bar.numel(), per_sample = n / x_bar.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_state_net(x_bar, eps, "genie_step_cuda", [&](auto s, auto nt) {
    using state_t = decltype(s);
    using net_t = decltype(nt);
    const state_t* xb = x_bar.data_ptr<state_t>();
    const net_t* e = eps.data_ptr<net_t>();
    const net_t* hd = head_out.data_ptr<net_t>();
    state_t* xo = x_bar_next.data_ptr<state_t>();
    net_t* no = x_next.data_ptr<net_t>();
    const bool vec = per_sample % kVec == 0 && vec_aligned(xb) && vec_aligned(e) && vec_aligned(hd) &&
                     vec_aligned(xo) && vec_aligned(no);
    genie_step_kernel<state_t, net_t><<<num_blocks(vec ? n / kVec : n), kThreads, 0, stream>>>(
        xb, e, hd, coeff_row(coeffs), xo, no, n, per_sample, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> genie_step_cuda(const at::Tensor& x_bar, const at::Tensor& eps,
                                                   const at::Tensor& head_out, const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar), x_next = empty_contiguous(eps);
  genie_step_out_cuda(x_bar, eps, head_out, coeffs, x_bar_next, x_next);
  return {x_bar_next, x_next};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) {
  m.impl("genie_step", &cuda::genie_step_cuda);
  m.impl("genie_step_out", &cuda::genie_step_out_cuda);
}

}  // namespace genie_fast
