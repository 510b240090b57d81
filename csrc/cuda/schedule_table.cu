// schedule_table on CUDA: the VPSchedule coefficient table for a device grid of times, one
// thread per step, float64, the same closed forms as the CPU kernel and the host table.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "step_cuda.cuh"

namespace genie_fast {
namespace cuda {
namespace {

template <typename ts_t>
__global__ void schedule_table_kernel(const ts_t* ts, int64_t n_steps, double beta_min, double beta_d,
                                      double* table) {
  for (int64_t n = global_thread(); n < n_steps; n += grid_threads()) {
    vp_table_row(ts, n, beta_min, beta_d, table + n * kNumCols);
  }
}

at::Tensor schedule_table_cuda(const at::Tensor& ts_in, double beta_min, double beta_d) {
  check_schedule_args(ts_in, beta_min, beta_d);
  const c10::cuda::OptionalCUDAGuard guard(ts_in.device());
  const at::Tensor ts = ts_in.contiguous();
  const int64_t n_steps = ts.numel() - 1;
  at::Tensor table = at::empty({n_steps, int64_t(kNumCols)}, ts.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(ts.scalar_type(), "schedule_table_cuda", [&] {
    schedule_table_kernel<scalar_t><<<num_blocks(n_steps), kThreads, 0, stream>>>(
        ts.data_ptr<scalar_t>(), n_steps, beta_min, beta_d, table.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return table;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) { m.impl("schedule_table", &cuda::schedule_table_cuda); }

}  // namespace genie_fast
