// Argument checks, coefficient layout and the per-element step math shared by the CPU (.cpp)
// and CUDA (.cu) kernels, so both backends compute exactly the same formulas in the same order.
#pragma once
// Narrow ATen includes (not ATen/ATen.h): about a fifth less compile time per file under nvcc.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#if defined(__CUDACC__)
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

namespace genie_fast {

// Columns of schedule.coeff_table; keep in sync with genie_fast/schedule.py COEFF_COLUMNS.
enum Col : int64_t {
  kT = 0, kTNext, kGamma, kGammaNext, kH, kHalfH2, kW1, kW2, kW3, kScale, kInvScaleNext,
  kDpmR, kDpmA, kDpmB, kNumCols
};

// --------------------------------------------------------------------------- argument checks

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
                                const at::Tensor& coeffs, const at::Tensor& x_bar_next, const at::Tensor& x_next,
                                const at::Tensor& x0) {
  check_state_and_eps(x_bar, eps);
  check_like_state(x0_prev, x_bar, "x0_prev");
  check_coeffs(coeffs, x_bar);
  check_out(x_bar_next, x_bar, x_bar.scalar_type(), "x_bar_next");
  check_out(x_next, x_bar, eps.scalar_type(), "x_next");
  check_out(x0, x_bar, x_bar.scalar_type(), "x0");
}

// A fresh contiguous (row-major) output of t's shape, dtype and device.
inline at::Tensor empty_contiguous(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
}

// --------------------------------------------------------------------------- per-element math
// op_t is the math type: float for a float32 state, double for a float64 state. Coefficients are
// rounded to op_t first, exactly as the PyTorch references do (coeffs.to(state dtype)).

template <typename op_t>
struct StepCoeffs {
  op_t gamma, gamma_next, h, half_h2, w1, w2, w3, inv_scale_next, dpm_r, dpm_a, dpm_b;
};

template <typename op_t, typename coef_t>
GF_HD StepCoeffs<op_t> load_coeffs(const coef_t* c, int64_t stride) {
  StepCoeffs<op_t> k;
  k.gamma = op_t(c[kGamma * stride]);
  k.gamma_next = op_t(c[kGammaNext * stride]);
  k.h = op_t(c[kH * stride]);
  k.half_h2 = op_t(c[kHalfH2 * stride]);
  k.w1 = op_t(c[kW1 * stride]);
  k.w2 = op_t(c[kW2 * stride]);
  k.w3 = op_t(c[kW3 * stride]);
  k.inv_scale_next = op_t(c[kInvScaleNext * stride]);
  k.dpm_r = op_t(c[kDpmR * stride]);
  k.dpm_a = op_t(c[kDpmA * stride]);
  k.dpm_b = op_t(c[kDpmB * stride]);
  return k;
}

// GENIE eq. 9 with the head combined at gamma_n: x_bar + h eps + h^2/2 (w1 h1 + w2 h2 + w3 h3).
template <typename op_t>
GF_HD op_t genie_x_bar_next(op_t xb, op_t e, op_t h1, op_t h2, op_t h3, const StepCoeffs<op_t>& k) {
  const op_t deps = k.w1 * h1 + k.w2 * h2 + k.w3 * h3;
  return (xb + k.h * e) + k.half_h2 * deps;
}

// Euler in gamma (DDIM; the AFS first step with eps = x_T).
template <typename op_t>
GF_HD op_t ddim_x_bar_next(op_t xb, op_t e, const StepCoeffs<op_t>& k) {
  return xb + k.h * e;
}

// Final denoising at the end of the step: x0 = x_bar - gamma_next eps.
template <typename op_t>
GF_HD op_t denoise_x0(op_t xb, op_t e, const StepCoeffs<op_t>& k) {
  return xb - k.gamma_next * e;
}

// DPM-Solver++(2M) in x_bar: x0 = x_bar - gamma eps, x_bar_next = r x_bar + (1 - r)(a x0 + b x0_prev).
template <typename op_t>
GF_HD op_t dpmpp_x0(op_t xb, op_t e, const StepCoeffs<op_t>& k) {
  return xb - k.gamma * e;
}
template <typename op_t>
GF_HD op_t dpmpp_x_bar_next(op_t xb, op_t x0, op_t x0_prev, const StepCoeffs<op_t>& k) {
  const op_t d = k.dpm_a * x0 + k.dpm_b * x0_prev;
  return k.dpm_r * xb + (op_t(1) - k.dpm_r) * d;
}

// --------------------------------------------------------------------------- schedule table
// Row n of schedule.coeff_table for VPSchedule(beta_min, beta_d) and the grid ts (n_steps + 1
// times), in float64, with the same formulas in the same order as the host table.

GF_HD double vp_gamma(double t, double beta_min, double beta_d) {
  const double log_alpha = -0.5 * (beta_min * t + (0.5 * beta_d) * t * t);
  return ::sqrt(::expm1(-2.0 * log_alpha));  // gamma^2 = 1/alpha^2 - 1
}

template <typename ts_t>
GF_HD void vp_table_row(const ts_t* ts, int64_t n, double beta_min, double beta_d, double* row) {
  const double t = double(ts[n]), t_next = double(ts[n + 1]);
  const double g = vp_gamma(t, beta_min, beta_d), gn = vp_gamma(t_next, beta_min, beta_d);
  const double h = gn - g, one_g2 = 1.0 + g * g;
  row[kT] = t;
  row[kTNext] = t_next;
  row[kGamma] = g;
  row[kGammaNext] = gn;
  row[kH] = h;
  row[kHalfH2] = 0.5 * h * h;
  row[kW1] = -1.0 / g;
  row[kW2] = g / one_g2;
  row[kW3] = 1.0 / (g * one_g2);
  row[kScale] = ::sqrt(one_g2);
  row[kInvScaleNext] = 1.0 / ::sqrt(1.0 + gn * gn);
  row[kDpmR] = gn / g;
  // logSNR step ratio q = h_lambda_{n-1} / h_lambda_n, h_lambda_n = log gamma_n - log gamma_{n+1}
  double dpm_b = 0.0;
  if (n > 0) {
    const double g_prev = vp_gamma(double(ts[n - 1]), beta_min, beta_d);
    const double q = (::log(g_prev) - ::log(g)) / (::log(g) - ::log(gn));
    dpm_b = -0.5 / q;
  }
  row[kDpmA] = 1.0 - dpm_b;
  row[kDpmB] = dpm_b;
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

// --------------------------------------------------------------------------- CPU ISA variants
// The extension is built for the baseline x86-64 ISA (SSE2), while ATen's own CPU kernels pick
// AVX2/AVX-512 at run time. The CPU step loops are therefore compiled twice, for the baseline and
// for AVX2+FMA, and the AVX2 copy runs where the CPU has it (checked once).
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__)
#define GF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define GF_ALWAYS_INLINE __attribute__((always_inline)) inline
namespace genie_fast {
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
}  // namespace genie_fast
#else
#define GF_TARGET_AVX2
#define GF_ALWAYS_INLINE inline
namespace genie_fast {
inline bool cpu_has_avx2() { return false; }
}  // namespace genie_fast
#endif

namespace genie_fast {

// Calls f(state_t{}, net_t{}) for the supported dtype pairs: a float32 state with any network
// dtype, or a float64 state with float64 network outputs (checked by check_state_and_eps).
template <typename F>
void dispatch_state_net(const at::Tensor& x_bar, const at::Tensor& eps, const char* name, F&& f) {
  if (x_bar.scalar_type() == at::kDouble) {
    f(double{}, double{});
    return;
  }
  switch (eps.scalar_type()) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kHalf: f(float{}, c10::Half{}); break;
    case at::kBFloat16: f(float{}, c10::BFloat16{}); break;
    case at::kDouble: f(float{}, double{}); break;
    default: TORCH_CHECK(false, "genie_fast: ", name, ": unsupported network dtype ", eps.scalar_type());
  }
}

}  // namespace genie_fast
