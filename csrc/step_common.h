// Argument checks and coefficient layout shared by the step kernels of every backend.
#pragma once
#include <ATen/ATen.h>

namespace genie_fast {

// Columns of schedule.coeff_table; keep in sync with genie_fast/schedule.py COEFF_COLUMNS.
enum Col : int64_t {
  kT = 0, kTNext, kGamma, kGammaNext, kH, kHalfH2, kW1, kW2, kW3, kScale, kInvScaleNext,
  kDpmR, kDpmA, kDpmB, kNumCols
};

inline void check_state_and_eps(const at::Tensor& x_bar, const at::Tensor& eps) {
  TORCH_CHECK(x_bar.dim() >= 2, "genie_fast: x_bar must be (B, C, ...), got ", x_bar.sizes());
  TORCH_CHECK(x_bar.sizes() == eps.sizes(), "genie_fast: x_bar ", x_bar.sizes(), " and eps ",
              eps.sizes(), " must have the same shape");
  TORCH_CHECK(x_bar.scalar_type() == at::kFloat || x_bar.scalar_type() == at::kDouble,
              "genie_fast: the ODE state x_bar must be float32 or float64, got ", x_bar.scalar_type());
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

inline void check_coeffs(const at::Tensor& coeffs, const at::Tensor& x_bar) {
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.numel() >= kNumCols,
              "genie_fast: coeffs must be one row of coeff_table (", int64_t(kNumCols), " values), got shape ",
              coeffs.sizes());
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat || coeffs.scalar_type() == at::kDouble,
              "genie_fast: coeffs must be float32 or float64, got ", coeffs.scalar_type());
  TORCH_CHECK(coeffs.device() == x_bar.device(), "genie_fast: coeffs are on ", coeffs.device(),
              ", x_bar on ", x_bar.device(), " (move the coefficient table to the sampling device)");
}

}  // namespace genie_fast
