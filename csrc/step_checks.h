// The argument checks of the fused ops, shared by the CPU and CUDA kernels (and mirrored by the
// Triton launchers in kernels/): inputs, the coefficient row, a solver's weights and the
// preallocated outputs every step op writes into.
#pragma once
// Narrow ATen includes (not ATen/ATen.h): about a fifth less compile time per file under nvcc.
#include <ATen/core/Tensor.h>

#include "step_formulas.h"

namespace genie_fast {

inline void check_state_and_eps(const at::Tensor& x_bar, const at::Tensor& eps) {
  TORCH_CHECK(x_bar.dim() >= 2, "genie_fast: x_bar must be (B, C, ...), got ", x_bar.sizes());
  TORCH_CHECK(x_bar.sizes() == eps.sizes(), "genie_fast: x_bar ", x_bar.sizes(), " and eps ",
              eps.sizes(), " must have the same shape");
  TORCH_CHECK(x_bar.scalar_type() == at::kFloat || x_bar.scalar_type() == at::kDouble,
              "genie_fast: the ODE state x_bar must be float32 or float64, got ", x_bar.scalar_type());
  TORCH_CHECK(eps.scalar_type() == at::kFloat || eps.scalar_type() == at::kHalf ||
                  eps.scalar_type() == at::kBFloat16 || eps.scalar_type() == at::kDouble,
              "genie_fast: network outputs must be float32, float16, bfloat16 or float64, got ",
              eps.scalar_type());
  TORCH_CHECK(x_bar.scalar_type() == at::kFloat || eps.scalar_type() == at::kDouble,
              "genie_fast: a float64 state needs float64 network outputs, got eps ", eps.scalar_type());
  TORCH_CHECK(eps.device() == x_bar.device(), "genie_fast: eps is on ", eps.device(), ", x_bar on ",
              x_bar.device());
}

inline void check_head(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& head_out) {
  auto want = x_bar.sizes().vec();
  want[1] *= 3;
  TORCH_CHECK(head_out.sizes().vec() == want, "genie_fast: head output must have shape ", want,
              " (3*C channels [h1|h2|h3]), got ", head_out.sizes());
  TORCH_CHECK(head_out.scalar_type() == eps.scalar_type(), "genie_fast: head output dtype ",
              head_out.scalar_type(), " differs from eps dtype ", eps.scalar_type());
  TORCH_CHECK(head_out.device() == x_bar.device(), "genie_fast: head output is on ", head_out.device(),
              ", x_bar on ", x_bar.device());
}

// A second state-dtype input of x_bar's shape (x0_prev of DPM-Solver++(2M)).
inline void check_like_state(const at::Tensor& t, const at::Tensor& x_bar, const char* name) {
  TORCH_CHECK(t.sizes() == x_bar.sizes(), "genie_fast: ", name, " ", t.sizes(), " must have the shape of x_bar ",
              x_bar.sizes());
  TORCH_CHECK(t.scalar_type() == x_bar.scalar_type(), "genie_fast: ", name, " dtype ", t.scalar_type(),
              " must be the state dtype ", x_bar.scalar_type());
  TORCH_CHECK(t.device() == x_bar.device(), "genie_fast: ", name, " is on ", t.device(), ", x_bar on ",
              x_bar.device());
}

// `slots` state-dtype tensors of x_bar's shape stacked on a new dim 0 (genie_multistep's history).
inline void check_history(const at::Tensor& t, const at::Tensor& x_bar, int64_t slots, const char* name) {
  auto want = x_bar.sizes().vec();
  want.insert(want.begin(), slots);
  TORCH_CHECK(t.sizes().vec() == want, "genie_fast: ", name, " must have shape ", want, " (", slots,
              " slots of x_bar's shape), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x_bar.scalar_type(), "genie_fast: ", name, " dtype ", t.scalar_type(),
              " must be the state dtype ", x_bar.scalar_type());
  TORCH_CHECK(t.device() == x_bar.device(), "genie_fast: ", name, " is on ", t.device(), ", x_bar on ",
              x_bar.device());
}

// A 1-D vector of `n` solver weights of one step in any float dtype (read in the state's math type).
inline void check_weights(const at::Tensor& w, const at::Tensor& x_bar, int64_t n) {
  TORCH_CHECK(w.dim() == 1 && w.numel() == n, "genie_fast: weights must be ", n, " values, got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble || w.scalar_type() == at::kHalf ||
                  w.scalar_type() == at::kBFloat16,
              "genie_fast: weights must be float64, float32, float16 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.device() == x_bar.device(), "genie_fast: weights are on ", w.device(), ", x_bar on ",
              x_bar.device());
}

inline void check_coeffs(const at::Tensor& coeffs, const at::Tensor& x_bar) {
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.numel() >= kNumCols,
              "genie_fast: coeffs must be one row of coeff_table (", int64_t(kNumCols), " values), got shape ",
              coeffs.sizes());
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat || coeffs.scalar_type() == at::kDouble,
              "genie_fast: coeffs must be float32 or float64, got ", coeffs.scalar_type());
  TORCH_CHECK(coeffs.device() == x_bar.device(), "genie_fast: coeffs are on ", coeffs.device(),
              ", x_bar on ", x_bar.device(), " (move the coefficient table to the sampling device)");
}

// Preallocated outputs are written in place, so they must be dense row-major buffers: refuse
// anything else instead of silently writing into a temporary copy.
inline void check_out(const at::Tensor& out, const at::Tensor& like, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(out.sizes() == like.sizes(), "genie_fast: output ", name, " has shape ", out.sizes(), ", expected ",
              like.sizes());
  TORCH_CHECK(out.scalar_type() == dtype, "genie_fast: output ", name, " has dtype ", out.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(out.device() == like.device(), "genie_fast: output ", name, " is on ", out.device(), ", inputs on ",
              like.device());
  TORCH_CHECK(out.is_contiguous(), "genie_fast: output ", name,
              " must be contiguous (row-major); channels_last or strided outputs are not supported");
}

// The full argument checks of each step op (inputs and preallocated outputs), shared by backends.
inline void check_genie_step(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& head_out,
                             const at::Tensor& coeffs, const at::Tensor& x_bar_next, const at::Tensor& x_next) {
  check_state_and_eps(x_bar, eps);
  check_head(x_bar, eps, head_out);
  check_coeffs(coeffs, x_bar);
  check_out(x_bar_next, x_bar, x_bar.scalar_type(), "x_bar_next");
  check_out(x_next, x_bar, eps.scalar_type(), "x_next");
}

inline void check_ddim_step(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs,
                            const at::Tensor& x_bar_next, const at::Tensor& x_next) {
  check_state_and_eps(x_bar, eps);
  check_coeffs(coeffs, x_bar);
  check_out(x_bar_next, x_bar, x_bar.scalar_type(), "x_bar_next");
  check_out(x_next, x_bar, eps.scalar_type(), "x_next");
}

inline void check_denoise_step(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs,
                               const at::Tensor& x0) {
  check_state_and_eps(x_bar, eps);
  check_coeffs(coeffs, x_bar);
  check_out(x0, x_bar, x_bar.scalar_type(), "x0");
}

inline void check_dpmpp_2m_step(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& x0_prev,
                                const at::Tensor& weights, const at::Tensor& coeffs, const at::Tensor& x_bar_next,
                                const at::Tensor& x_next, const at::Tensor& x0) {
  check_state_and_eps(x_bar, eps);
  check_like_state(x0_prev, x_bar, "x0_prev");
  check_weights(weights, x_bar, kDpmpp2mWeights);
  check_coeffs(coeffs, x_bar);
  check_out(x_bar_next, x_bar, x_bar.scalar_type(), "x_bar_next");
  check_out(x_next, x_bar, eps.scalar_type(), "x_next");
  check_out(x0, x_bar, x_bar.scalar_type(), "x0");
}

inline void check_genie_multistep_step(const at::Tensor& x_bar, const at::Tensor& x_bar_eval, const at::Tensor& eps,
                                       const at::Tensor& head_out, const at::Tensor& x0_hist, const at::Tensor& d_hist,
                                       const at::Tensor& weights, const at::Tensor& coeffs,
                                       const at::Tensor& x_bar_next, const at::Tensor& x_bar_pred,
                                       const at::Tensor& x_pred, const at::Tensor& x0, const at::Tensor& d) {
  check_state_and_eps(x_bar, eps);
  check_like_state(x_bar_eval, x_bar, "x_bar_eval");
  check_head(x_bar, eps, head_out);
  check_history(x0_hist, x_bar, kMultistepX0Slots, "x0_hist");
  check_history(d_hist, x_bar, kMultistepDSlots, "d_hist");
  check_weights(weights, x_bar, kMultistepWeights);
  check_coeffs(coeffs, x_bar);
  check_out(x_bar_next, x_bar, x_bar.scalar_type(), "x_bar_next");
  check_out(x_bar_pred, x_bar, x_bar.scalar_type(), "x_bar_pred");
  check_out(x_pred, x_bar, eps.scalar_type(), "x_pred");
  check_out(x0, x_bar, x_bar.scalar_type(), "x0");
  check_out(d, x_bar, x_bar.scalar_type(), "d");
}

inline void check_schedule_args(const at::Tensor& ts, double beta_min, double beta_d) {
  TORCH_CHECK(ts.dim() == 1 && ts.numel() >= 2, "genie_fast: ts must be a 1-D grid of at least two times, got shape ",
              ts.sizes());
  TORCH_CHECK(ts.scalar_type() == at::kFloat || ts.scalar_type() == at::kDouble,
              "genie_fast: ts must be float32 or float64, got ", ts.scalar_type());
  TORCH_CHECK(beta_min >= 0.0 && beta_d > 0.0, "genie_fast: VP schedule needs beta_min >= 0 and beta_d > 0, got ",
              beta_min, ", ", beta_d);
}

}  // namespace genie_fast
