// The math of the fused ops, once, for every C++ backend: the coefficient-table layout, each step
// op's per-element update (the same as its PyTorch reference genie_fast.ops.<op>_ref, in the same
// order) and the schedule table's row. The CPU loop (step_cpu.h) and the CUDA loop
// (cuda/step_cuda.cuh) run these formulas; nothing here knows about tensors or devices.
#pragma once
#include <cmath>
#include <cstdint>
#include <tuple>

#if defined(__CUDACC__)
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

namespace genie_fast {

// Columns of schedule.coeff_table; keep in sync with genie_fast/schedule.py COEFF_COLUMNS.
enum Col : int64_t {
  kT = 0, kTNext, kGamma, kGammaNext, kH, kHalfH2, kW1, kW2, kW3, kScale, kInvScaleNext, kDpmR, kNumCols
};

// The per-step weight vectors solvers pass beside the row; keep in sync with genie_fast/layout.py.
// genie_multistep: history slots and one weight row (corrector, predictor, inv_scale).
constexpr int kMultistepX0Slots = 3, kMultistepDSlots = 2;
constexpr int kMultistepTerms = 3 + kMultistepX0Slots + kMultistepDSlots;  // base, x0, d, X0..X2, D0..D1
constexpr int kMultistepWeights = 2 * kMultistepTerms + 1;
// DPM-Solver++(2M): the weights a of x0_n and b of x0_{n-1}.
constexpr int kDpmpp2mA = 0, kDpmpp2mB = 1, kDpmpp2mWeights = 2;

// --------------------------------------------------------------------------- constants of a call
// op_t is the math type: float for a float32 state, double for a float64 state. Coefficients are
// rounded to op_t first, exactly as the PyTorch references do (coeffs.to(state dtype)).

template <typename op_t>
struct StepCoeffs {
  op_t gamma, gamma_next, h, half_h2, w1, w2, w3, inv_scale_next, dpm_r;
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
  return k;
}

// The coefficient row and, for a formula that declares kWeights = NW > 0, the NW weights a solver
// gives beside it (one step's solver weights). A formula without weights takes a StepCoeffs.
template <typename op_t, int NW>
struct StepConsts : StepCoeffs<op_t> {
  op_t weights[NW];
};
template <typename op_t>
struct StepConsts<op_t, 0> : StepCoeffs<op_t> {};

// The op_t values a formula returns, one per output, in the outputs' order.
template <typename op_t, int N>
struct Vals {
  op_t v[N];
};

// The roles of a step op's tensors: the ODE state's dtype (x_bar, x0_prev, x_bar_next, x0), the
// network's dtype (eps, x_next), or the head output (B, 3C, ...), read as its parts h1, h2, h3;
// Slots<R, K>: K tensors in role R of x_bar's shape stacked on a new dim 0 (K, B, C, ...), read as
// K inputs (genie_multistep's history). A formula gets one op_t argument per part, in order.
struct State {};
struct Net {};
struct Head {};
template <typename R, int K>
struct Slots {};

// --------------------------------------------------------------------------- the step ops

// GENIE eq. 9 with the head combined at gamma_n: x_bar + h eps + h^2/2 (w1 h1 + w2 h2 + w3 h3).
struct GenieStep {
  using Inputs = std::tuple<State, Net, Head>;  // x_bar, eps, head_out
  using Outputs = std::tuple<State, Net>;       // x_bar_next, x_next
  template <typename op_t>
  GF_HD Vals<op_t, 2> operator()(const StepCoeffs<op_t>& k, op_t xb, op_t e, op_t h1, op_t h2, op_t h3) const {
    const op_t deps = k.w1 * h1 + k.w2 * h2 + k.w3 * h3;
    const op_t v = (xb + k.h * e) + k.half_h2 * deps;
    return {{v, v * k.inv_scale_next}};
  }
};

// Euler in gamma (DDIM; the AFS first step with eps = x_T).
struct DdimStep {
  using Inputs = std::tuple<State, Net>;   // x_bar, eps
  using Outputs = std::tuple<State, Net>;  // x_bar_next, x_next
  template <typename op_t>
  GF_HD Vals<op_t, 2> operator()(const StepCoeffs<op_t>& k, op_t xb, op_t e) const {
    const op_t v = xb + k.h * e;
    return {{v, v * k.inv_scale_next}};
  }
};

// Final denoising at the end of the step: x0 = x_bar - gamma_next eps.
struct DenoiseStep {
  using Inputs = std::tuple<State, Net>;  // x_bar, eps
  using Outputs = std::tuple<State>;      // x0
  template <typename op_t>
  GF_HD Vals<op_t, 1> operator()(const StepCoeffs<op_t>& k, op_t xb, op_t e) const {
    return {{xb - k.gamma_next * e}};
  }
};

// DPM-Solver++(2M) in x_bar: x0 = x_bar - gamma eps, x_bar_next = r x_bar + (1 - r)(a x0 + b x0_prev),
// with r = gamma_next / gamma from the row and the solver's weights (a, b) of the step. x0 is the
// next step's x0_prev.
struct Dpmpp2mStep {
  static constexpr int kWeights = kDpmpp2mWeights;
  using Inputs = std::tuple<State, Net, State>;   // x_bar, eps, x0_prev
  using Outputs = std::tuple<State, Net, State>;  // x_bar_next, x_next, x0
  template <typename op_t>
  GF_HD Vals<op_t, 3> operator()(const StepConsts<op_t, kWeights>& k, op_t xb, op_t e, op_t x0_prev) const {
    const op_t x0 = xb - k.gamma * e;
    const op_t d = k.weights[kDpmpp2mA] * x0 + k.weights[kDpmpp2mB] * x0_prev;
    const op_t v = k.dpm_r * xb + (op_t(1) - k.dpm_r) * d;
    return {{v, v * k.inv_scale_next, x0}};
  }
};

// acc + w[0] t_0 + w[1] t_1 + ..., added left to right (the order of the PyTorch reference).
template <typename op_t, typename... T>
GF_HD op_t weighted_sum(op_t acc, const op_t* w, T... t) {
  int i = 0;
  ((acc = acc + w[i++] * t), ...);
  return acc;
}

// genie_multistep at its evaluation point: x0 = x_bar_eval - gamma eps and d = gamma^2 (w1 h1 + w2 h2
// + w3 h3) (d x0 / d lambda from the raw head); with the terms T = [x0, d, X0, X1, X2, D0, D1] (the
// history slots) and the step's weights w, the corrector x_bar_next = w[0] x_bar + sum w[1 + i] T_i,
// the predictor x_bar_pred = w[8] x_bar_next + sum w[9 + i] T_i and the next input x_bar_pred w[16].
struct GenieMultistepStep {
  static constexpr int kWeights = kMultistepWeights;
  // x_bar, eps, x_bar_eval, head_out, x0_hist, d_hist (x_bar and eps first, as run_step reads them)
  using Inputs = std::tuple<State, Net, State, Head, Slots<State, kMultistepX0Slots>, Slots<State, kMultistepDSlots>>;
  using Outputs = std::tuple<State, State, Net, State, State>;  // x_bar_next, x_bar_pred, x_pred, x0, d
  template <typename op_t>
  GF_HD Vals<op_t, 5> operator()(const StepConsts<op_t, kWeights>& k, op_t xb, op_t e, op_t xb_eval, op_t h1,
                                 op_t h2, op_t h3, op_t x0_0, op_t x0_1, op_t x0_2, op_t d_0, op_t d_1) const {
    static_assert(kMultistepX0Slots == 3 && kMultistepDSlots == 2, "one argument per history slot");
    const op_t x0 = xb_eval - k.gamma * e;
    const op_t d = (k.gamma * k.gamma) * (k.w1 * h1 + k.w2 * h2 + k.w3 * h3);
    const op_t* w = k.weights;
    const op_t next = weighted_sum(w[0] * xb, w + 1, x0, d, x0_0, x0_1, x0_2, d_0, d_1);
    const op_t pred =
        weighted_sum(w[kMultistepTerms] * next, w + kMultistepTerms + 1, x0, d, x0_0, x0_1, x0_2, d_0, d_1);
    return {{next, pred, pred * w[2 * kMultistepTerms], x0, d}};
  }
};

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
}

}  // namespace genie_fast
