// Schemas of genie_fast's fused ops, registered as torch.ops.genie_fast.<op>.
// Kernels are registered beside this file: <op>_cpu.cpp (CPU) and cuda/<op>.cu (CUDA); each op's
// formula and the CPU loop are in step_common.h, the CUDA loop in cuda/step_cuda.cuh.
//
// coeffs is always one row of schedule.coeff_table (float32 or float64) on the tensors' device:
// kernels read it from device memory, so no host scalar is baked into a launch and a step can
// be captured in a CUDA graph. Each step op has a functional form and an `_out` form that
// writes into preallocated contiguous outputs (which may be the inputs themselves: every
// element is read before it is written, so x_bar can be updated in place).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(genie_fast, m) {
  // One GENIE step: combine the head's [h1|h2|h3] into d eps/d gamma, take the second-order
  // Taylor step on x_bar, write the next network input. Returns (x_bar_next, x_next).
  m.def("genie_step(Tensor x_bar, Tensor eps, Tensor head_out, Tensor coeffs) -> (Tensor, Tensor)");
  m.def("genie_step_out(Tensor x_bar, Tensor eps, Tensor head_out, Tensor coeffs, "
        "Tensor(a!) x_bar_next, Tensor(b!) x_next) -> ()");
  // DDIM (Euler in gamma) step, also the AFS first step with eps = x_T. Returns (x_bar_next, x_next).
  m.def("ddim_step(Tensor x_bar, Tensor eps, Tensor coeffs) -> (Tensor, Tensor)");
  m.def("ddim_step_out(Tensor x_bar, Tensor eps, Tensor coeffs, Tensor(a!) x_bar_next, Tensor(b!) x_next) -> ()");
  // Final denoising x0 = x_bar - gamma_next eps (state dtype).
  m.def("denoise_step(Tensor x_bar, Tensor eps, Tensor coeffs) -> Tensor");
  m.def("denoise_step_out(Tensor x_bar, Tensor eps, Tensor coeffs, Tensor(a!) x0) -> ()");
  // DPM-Solver++(2M) step in x_bar. Returns (x_bar_next, x_next, x0); x0 is the next x0_prev.
  m.def("dpmpp_2m_step(Tensor x_bar, Tensor eps, Tensor x0_prev, Tensor coeffs) -> (Tensor, Tensor, Tensor)");
  m.def("dpmpp_2m_step_out(Tensor x_bar, Tensor eps, Tensor x0_prev, Tensor coeffs, "
        "Tensor(a!) x_bar_next, Tensor(b!) x_next, Tensor(c!) x0) -> ()");
  // genie_multistep: the corrector of the step ending at the evaluation point x_bar_eval, then the
  // predictor of the next step, from eps, the raw head [h1|h2|h3], the history slots x0_hist (3, B, C, ...)
  // and d_hist (2, B, C, ...), and the step's 17 weights. Returns (x_bar_next, x_bar_pred, x_pred, x0, d).
  m.def("genie_multistep_step(Tensor x_bar, Tensor x_bar_eval, Tensor eps, Tensor head_out, Tensor x0_hist, "
        "Tensor d_hist, Tensor weights, Tensor coeffs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("genie_multistep_step_out(Tensor x_bar, Tensor x_bar_eval, Tensor eps, Tensor head_out, Tensor x0_hist, "
        "Tensor d_hist, Tensor weights, Tensor coeffs, Tensor(a!) x_bar_next, Tensor(b!) x_bar_pred, "
        "Tensor(c!) x_pred, Tensor(d!) x0, Tensor(e!) d) -> ()");
  // schedule.coeff_table of VPSchedule(beta_min, beta_d) for the grid ts (N + 1 times), computed
  // on ts's device: (N, len(COEFF_COLUMNS)) float64.
  m.def("schedule_table(Tensor ts, float beta_min, float beta_d) -> Tensor");
}

// A plain module init: the ops register themselves when the library is loaded, so no pybind11
// is needed (and no clash between pip's pybind11 headers and the copy bundled with torch).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "genie_fast fused ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
