// genie_multistep_step on CUDA: genie_multistep's corrector and the next step's predictor at one
// network evaluation (data prediction and its log-SNR derivative from the head, then two weighted
// sums over the history slots).
// The formula is GenieMultistepStep (../step_formulas.h), run by CudaLoop (step_cuda.cuh).
#include <torch/library.h>

#include "step_cuda.cuh"

TORCH_LIBRARY_IMPL(genie_fast, CUDA, m) {
  m.impl("genie_multistep_step_out", &genie_fast::genie_multistep_step_out<genie_fast::cuda::CudaLoop>);
}
