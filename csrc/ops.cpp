// Schemas of genie_fast's fused ops, registered as torch.ops.genie_fast.<op>.
// Kernels live beside this file: <op>_cpu.cpp (CPU) and cuda/<op>.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(genie_fast, m) {
  // One GENIE step: combine the head's [h1|h2|h3] into d eps/d gamma, take the
  // second-order Taylor step on x_bar, write the next network input.
  // coeffs: one row of schedule.coeff_table. Returns (x_bar_next, x_next).
  m.def("genie_step(Tensor x_bar, Tensor eps, Tensor head_out, Tensor coeffs) -> (Tensor, Tensor)");
}

// A plain module init: the ops register themselves when the library is loaded,
// so no pybind11 is needed (see TOOLCHAIN.md).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "genie_fast fused ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
