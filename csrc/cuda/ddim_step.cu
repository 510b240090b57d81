// ddim_step on CUDA: one DDIM step (Euler in gamma; the AFS first step with eps = x_T).
// The formula is DdimStep (../step_formulas.h), run by CudaLoop (step_cuda.cuh).
#include <torch/library.h>

#include "step_cuda.cuh"

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) {
  m.impl("ddim_step_out", &genie_fast::ddim_step_out<genie_fast::cuda::CudaLoop>);
}
