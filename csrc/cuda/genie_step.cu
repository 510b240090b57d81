// genie_step on CUDA: one GENIE step (the head combined at gamma_n, then the second-order
// Taylor step on x_bar).
// The formula is GenieStep (../step_formulas.h), run by CudaLoop (step_cuda.cuh).
#include <torch/library.h>

#include "step_cuda.cuh"

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) {
  m.impl("genie_step_out", &genie_fast::genie_step_out<genie_fast::cuda::CudaLoop>);
}
