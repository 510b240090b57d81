// denoise_step on CUDA: the final denoising x0 = x_bar - gamma_next eps.
// The formula is DenoiseStep (../step_formulas.h), run by CudaLoop (step_cuda.cuh).
#include <torch/library.h>

#include "step_cuda.cuh"

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) {
  m.impl("denoise_step_out", &genie_fast::denoise_step_out<genie_fast::cuda::CudaLoop>);
}
