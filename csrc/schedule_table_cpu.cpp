// schedule_table on the CPU: schedule.coeff_table of a VPSchedule for a grid of times, one row
// per step, float64 (the same closed forms as the host table, shared with the CUDA kernel:
// vp_table_row in step_formulas.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "step_checks.h"

namespace genie_fast {
namespace {

at::Tensor schedule_table_cpu(const at::Tensor& ts_in, double beta_min, double beta_d) {
  check_schedule_args(ts_in, beta_min, beta_d);
  const at::Tensor ts = ts_in.contiguous();
  const int64_t n_steps = ts.numel() - 1;
  at::Tensor table = at::empty({n_steps, int64_t(kNumCols)}, ts.options().dtype(at::kDouble));
  double* out = table.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(ts.scalar_type(), "schedule_table_cpu", [&] {
    const scalar_t* t = ts.data_ptr<scalar_t>();
    at::parallel_for(0, n_steps, 256, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) vp_table_row(t, n, beta_min, beta_d, out + n * kNumCols);
    });
  });
  return table;
}

}  // namespace

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) { m.impl("schedule_table", &schedule_table_cpu); }

}  // namespace genie_fast
