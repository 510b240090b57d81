// Schemas of genie_fast's fused ops, registered as torch.ops.genie_fast.<op>.
// Kernels are registered beside this file: <op>_cpu.cpp (CPU) and cuda/<op>.cu (CUDA). Each op's
// formula is in step_formulas.h, its checks in step_checks.h, the `<op>_out` wrappers in
// step_ops.h, the CPU loop in step_cpu.h and the CUDA loop in cuda/step_cuda.cuh.
//
// The step ops have one form: `<op>_out`, which writes into preallocated contiguous outputs and
// returns nothing (genie_fast.ops allocates the outputs of its functional API in Python). The
// outputs may be the inputs themselves: every element is read before it is written, so x_bar can
// be updated in place. coeffs is always one row of schedule.coeff_table (float32 or float64) on
// the tensors' device, and weights a solver's per-step weight vector (any float dtype): kernels
// read both from device memory, so no host scalar is baked into a launch and a step can be
// captured in a CUDA graph.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(genie_fast, m) {
  // One GENIE step: combine the head's [h1|h2|h3] into d eps/d gamma, take the second-order
  // Taylor step on x_bar, write the next network input.
  m.def("genie_step_out(Tensor x_bar, Tensor eps, Tensor head_out, Tensor coeffs, "
        "Tensor(a!) x_bar_next, Tensor(b!) x_next) -> ()");
  // DDIM (Euler in gamma) step, also the AFS first step with eps = x_T.
  m.def("ddim_step_out(Tensor x_bar, Tensor eps, Tensor coeffs, Tensor(a!) x_bar_next, Tensor(b!) x_next) -> ()");
  // Final denoising x0 = x_bar - gamma_next eps (state dtype).
  m.def("denoise_step_out(Tensor x_bar, Tensor eps, Tensor coeffs, Tensor(a!) x0) -> ()");
  // DPM-Solver++(2M) step in x_bar with the step's weights (a, b) (layout.DPMPP_2M_WEIGHTS);
  // x0 is the next x0_prev.
  m.def("dpmpp_2m_step_out(Tensor x_bar, Tensor eps, Tensor x0_prev, Tensor weights, Tensor coeffs, "
        "Tensor(a!) x_bar_next, Tensor(b!) x_next, Tensor(c!) x0) -> ()");
  // genie_multistep: the corrector of the step ending at the evaluation point x_bar_eval, then the
  // predictor of the next step, from eps, the raw head [h1|h2|h3], the history slots x0_hist (3, B, C, ...)
  // and d_hist (2, B, C, ...), and the step's 17 weights (layout.MULTISTEP_WEIGHTS).
  m.def("genie_multistep_step_out(Tensor x_bar, Tensor x_bar_eval, Tensor eps, Tensor head_out, Tensor x0_hist, "
        "Tensor d_hist, Tensor weights, Tensor coeffs, Tensor(a!) x_bar_next, Tensor(b!) x_bar_pred, "
        "Tensor(c!) x_pred, Tensor(d!) x0, Tensor(e!) d) -> ()");
  // schedule.coeff_table of VPSchedule(beta_min, beta_d) for the grid ts (N + 1 times), computed
  // on ts's device: (N, len(COEFF_COLUMNS)) float64. Functional: it runs once per plan, outside
  // any captured loop, and its size follows from ts, so an out form would add a schema for no caller.
  m.def("schedule_table(Tensor ts, float beta_min, float beta_d) -> Tensor");
}

// A plain module init: the ops register themselves when the library is loaded, so no pybind11
// is needed (and no clash between pip's pybind11 headers and the copy bundled with torch).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "genie_fast fused ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
