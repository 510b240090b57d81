// dpmpp_2m_step on CUDA: one DPM-Solver++(2M) step in x_bar.
// The formula is Dpmpp2mStep (../step_formulas.h), run by CudaLoop (step_cuda.cuh).
#include <torch/library.h>

#include "step_cuda.cuh"

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) {
  m.impl("dpmpp_2m_step_out", &genie_fast::dpmpp_2m_step_out<genie_fast::cuda::CudaLoop>);
}
