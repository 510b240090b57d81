// The fused step ops, shared by the CPU (.cpp) and CUDA (.cu) kernels so both backends compute
// exactly the same formulas in the same order: argument checks, the coefficient layout, each op's
// formula and tensor roles, the CPU loop, and the functional and `_out` forms the op files register.
#pragma once
// Narrow ATen includes (not ATen/ATen.h): about a fifth less compile time per file under nvcc.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#if !defined(__CUDACC__)
#include <ATen/Parallel.h>
#endif

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

// genie_multistep's history slots and weight row; keep in sync with genie_fast/ops.py (MULTISTEP_*).
constexpr int kMultistepX0Slots = 3, kMultistepDSlots = 2;
constexpr int kMultistepTerms = 3 + kMultistepX0Slots + kMultistepDSlots;  // base, x0, d, X0..X2, D0..D1
constexpr int kMultistepWeights = 2 * kMultistepTerms + 1;                  // corrector, predictor, inv_scale

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

// A 1-D vector of `n` weights in any float dtype (read in the state's math type).
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
                                const at::Tensor& coeffs, const at::Tensor& x_bar_next, const at::Tensor& x_next,
                                const at::Tensor& x0) {
  check_state_and_eps(x_bar, eps);
  check_like_state(x0_prev, x_bar, "x0_prev");
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

// The constants of one call that a formula reads: the coefficient row and, for a formula that
// declares kWeights = NW > 0, a vector of NW weights given beside it (genie_multistep's step
// weights). A formula without weights takes a StepCoeffs (its base).
template <typename op_t, int NW>
struct StepConsts : StepCoeffs<op_t> {
  op_t weights[NW];
};
template <typename op_t>
struct StepConsts<op_t, 0> : StepCoeffs<op_t> {};

// F::kWeights, or 0 for a formula that declares none.
template <typename F, typename = void>
struct WeightsOf : std::integral_constant<int, 0> {};
template <typename F>
struct WeightsOf<F, std::void_t<decltype(F::kWeights)>> : std::integral_constant<int, F::kWeights> {};
template <typename F>
constexpr int kWeightsOf = WeightsOf<F>::value;

// --------------------------------------------------------------------------- the step ops
// A fused step op is its formula over op_t values at one element, the same as its PyTorch
// reference ops.<op>_ref, plus where its inputs and outputs live. Everything else (the casts to
// op_t and back, the parallel loop, vector loads, the launch) is one loop per backend: CpuLoop
// below, cuda::CudaLoop in cuda/step_cuda.cuh. <op>_cpu.cpp and cuda/<op>.cu register the ops.

// The op_t values a formula returns, one per output, in the outputs' order.
template <typename op_t, int N>
struct Vals {
  op_t v[N];
};

// Element i (of sample b) of a dense row-major tensor.
template <typename T>
struct Flat {
  using type = std::remove_const_t<T>;
  static constexpr bool kPerSample = false;
  T* p;
  GF_HD T* at(int64_t i, int64_t /*b*/) const { return p + i; }
};

// h1, h2 or h3 (part 0, 1, 2) of the head output (B, 3C, ...) for element i = b*CHW + j of
// x_bar: sample b's three parts are consecutive CHW runs from 3b*CHW, so its part q sits at
// i + (2b + q) * CHW.
template <typename T>
struct HeadPart {
  using type = std::remove_const_t<T>;
  static constexpr bool kPerSample = true;
  T* p;
  int64_t per_sample;  // C * H * W
  int64_t part;
  GF_HD T* at(int64_t i, int64_t b) const { return p + i + (2 * b + part) * per_sample; }
};

// The roles of a step op's tensors: the ODE state's dtype (x_bar, x0_prev, x_bar_next, x0), the
// network's dtype (eps, x_next), or the head output (B, 3C, ...), read as its parts h1, h2, h3;
// Slots<R, K>: K tensors in role R of x_bar's shape stacked on a new dim 0 (K, B, C, ...), read as
// K inputs (genie_multistep's history).
struct State {};
struct Net {};
struct Head {};
template <typename R, int K>
struct Slots {};

template <typename Role>
struct IsState : std::is_same<Role, State> {};
template <typename R, int K>
struct IsState<Slots<R, K>> : IsState<R> {};

template <typename Role>
struct IsSlots : std::false_type {};
template <typename R, int K>
struct IsSlots<Slots<R, K>> : std::true_type {
  static constexpr int kSlots = K;
};

template <typename Role, typename state_t, typename net_t>
using role_t = std::conditional_t<IsState<Role>::value, state_t, net_t>;

// Slot k of a dense (K, ...) tensor of `per_slot` elements per slot: a Flat run from k * per_slot.
template <typename T, size_t... k>
auto slot_views(T* p, int64_t per_slot, std::index_sequence<k...>) {
  return std::make_tuple(Flat<T>{p + int64_t(k) * per_slot}...);
}

// The accessors of one tensor in its role (T is const for an input).
template <typename T, typename Role>
auto views(Role, const at::Tensor& t) {
  T* p = t.data_ptr<std::remove_const_t<T>>();
  if constexpr (std::is_same_v<Role, Head>) {
    const int64_t chw = t.numel() / (3 * t.size(0));
    return std::make_tuple(HeadPart<T>{p, chw, 0}, HeadPart<T>{p, chw, 1}, HeadPart<T>{p, chw, 2});
  } else if constexpr (IsSlots<Role>::value) {
    return slot_views(p, t.numel() / IsSlots<Role>::kSlots, std::make_index_sequence<IsSlots<Role>::kSlots>{});
  } else {
    return std::make_tuple(Flat<T>{p});
  }
}

// The accessors of tensors t[0], t[1], ... in the roles R..., in order.
template <bool input, typename state_t, typename net_t, typename... R, size_t... j>
auto views_of(std::tuple<R...>*, const at::Tensor* t, std::index_sequence<j...>) {
  static_assert(sizeof...(R) == sizeof...(j), "one tensor per role");
  return std::tuple_cat(
      views<std::conditional_t<input, const role_t<R, state_t, net_t>, role_t<R, state_t, net_t>>>(R{}, t[j])...);
}

// Whether a tuple of accessors moves with the sample index: a loop then keeps each vector or SIMD
// run inside one sample.
template <typename Tuple>
struct PerSample;
template <typename... A>
struct PerSample<std::tuple<A...>> : std::bool_constant<(A::kPerSample || ...)> {};
template <typename Tuple>
constexpr bool kPerSample = PerSample<std::remove_cv_t<Tuple>>::value;

// The element type output accessor o of a tuple writes.
template <typename Tuple, size_t o>
using out_t = typename std::tuple_element_t<o, std::remove_cv_t<Tuple>>::type;

// GENIE eq. 9 with the head combined at gamma_n: x_bar + h eps + h^2/2 (w1 h1 + w2 h2 + w3 h3).
struct GenieStep {
  using Inputs = std::tuple<State, Net, Head>;  // x_bar, eps, head_out
  using Outputs = std::tuple<State, Net>;  // x_bar_next, x_next
  template <typename op_t>
  GF_HD Vals<op_t, 2> operator()(const StepCoeffs<op_t>& k, op_t xb, op_t e, op_t h1, op_t h2, op_t h3) const {
    const op_t deps = k.w1 * h1 + k.w2 * h2 + k.w3 * h3;
    const op_t v = (xb + k.h * e) + k.half_h2 * deps;
    return {{v, v * k.inv_scale_next}};
  }
};

// Euler in gamma (DDIM; the AFS first step with eps = x_T).
struct DdimStep {
  using Inputs = std::tuple<State, Net>;  // x_bar, eps
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
  using Outputs = std::tuple<State>;  // x0
  template <typename op_t>
  GF_HD Vals<op_t, 1> operator()(const StepCoeffs<op_t>& k, op_t xb, op_t e) const {
    return {{xb - k.gamma_next * e}};
  }
};

// DPM-Solver++(2M) in x_bar: x0 = x_bar - gamma eps, x_bar_next = r x_bar + (1 - r)(a x0 + b x0_prev).
// x0 is the next step's x0_prev.
struct Dpmpp2mStep {
  using Inputs = std::tuple<State, Net, State>;  // x_bar, eps, x0_prev
  using Outputs = std::tuple<State, Net, State>;  // x_bar_next, x_next, x0
  template <typename op_t>
  GF_HD Vals<op_t, 3> operator()(const StepCoeffs<op_t>& k, op_t xb, op_t e, op_t x0_prev) const {
    const op_t x0 = xb - k.gamma * e;
    const op_t d = k.dpm_a * x0 + k.dpm_b * x0_prev;
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

// --------------------------------------------------------------------------- CPU loop
// One pass over the flat index with at::parallel_for; inside a chunk, a SIMD loop over each run
// that stays within one sample (so a head part is a fixed offset from the flat index), compiled
// for the baseline ISA and for AVX2+FMA.
#if !defined(__CUDACC__)
namespace genie_fast {

constexpr int64_t kCpuGrain = 16384;

template <typename op_t, int NW, typename F, typename In, typename Out, size_t... a, size_t... o>
GF_ALWAYS_INLINE void cpu_rows(const F& f, const StepConsts<op_t, NW> k, const In& in, const Out& out, int64_t run,
                               int64_t begin, int64_t end, std::index_sequence<a...>, std::index_sequence<o...>) {
  for (int64_t i = begin; i < end;) {
    const int64_t b = i / run, stop = std::min(end, (b + 1) * run);
    const auto src = std::make_tuple(std::get<a>(in).at(0, b)...);
    const auto dst = std::make_tuple(std::get<o>(out).at(0, b)...);
#pragma omp simd
    for (int64_t j = i; j < stop; ++j) {
      const Vals<op_t, sizeof...(o)> v = f(k, op_t(std::get<a>(src)[j])...);
      ((std::get<o>(dst)[j] = out_t<Out, o>(v.v[o])), ...);
    }
    i = stop;
  }
}

template <typename op_t, int NW, typename F, typename In, typename Out>
GF_ALWAYS_INLINE void cpu_rows(const F& f, const StepConsts<op_t, NW>& k, const In& in, const Out& out, int64_t run,
                               int64_t begin, int64_t end) {
  cpu_rows(f, k, in, out, run, begin, end, std::make_index_sequence<std::tuple_size_v<In>>{},
           std::make_index_sequence<std::tuple_size_v<Out>>{});
}

// The same loop compiled for AVX2+FMA.
template <typename... A>
GF_TARGET_AVX2 void cpu_rows_avx2(const A&... a) {
  cpu_rows(a...);
}

struct CpuLoop {
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  // Coefficients (and weights) rounded to op_t on the host (one row, read once per call).
  template <typename op_t, typename F, typename In, typename Out>
  static void launch(const F& f, const at::Tensor& coeffs, const at::Tensor& weights, const In& in, const Out& out,
                     int64_t n, int64_t run) {
    constexpr int NW = kWeightsOf<F>;
    StepConsts<op_t, NW> k;
    const at::Tensor c64 = coeffs.to(at::kDouble);
    static_cast<StepCoeffs<op_t>&>(k) = load_coeffs<op_t>(c64.data_ptr<double>(), c64.stride(0));
    if constexpr (NW > 0) {
      const at::Tensor w64 = weights.to(at::kDouble);
      for (int i = 0; i < NW; ++i) k.weights[i] = op_t(w64.data_ptr<double>()[i * w64.stride(0)]);
    }
    const bool avx2 = cpu_has_avx2();
    at::parallel_for(0, n, kCpuGrain, [&](int64_t begin, int64_t end) {
      if (avx2) {
        cpu_rows_avx2(f, k, in, out, run, begin, end);
      } else {
        cpu_rows(f, k, in, out, run, begin, end);
      }
    });
  }
};

}  // namespace genie_fast
#endif

// --------------------------------------------------------------------------- the registered ops
// The functional and `_out` forms of each step op for a backend's Loop (CpuLoop, cuda::CudaLoop).
namespace genie_fast {

// After the checks: formula F over the inputs into the (checked, contiguous) outputs. Strided or
// channels_last inputs are handled by one contiguous copy; the first two inputs are x_bar and eps.
// weights: the F::kWeights weights beside the coefficient row (undefined for a formula without).
template <typename Loop, typename F, size_t NI, size_t NO>
void run_step(const char* name, const at::Tensor& coeffs, const at::Tensor (&ins)[NI], const at::Tensor (&outs)[NO],
              const at::Tensor& weights = at::Tensor()) {
  if (ins[0].numel() == 0) return;
  const typename Loop::Guard guard(ins[0].device());
  at::Tensor in[NI];
  for (size_t j = 0; j < NI; ++j) in[j] = ins[j].contiguous();
  const int64_t n = in[0].numel();
  dispatch_state_net(in[0], in[1], name, [&](auto s, auto nt) {
    using state_t = decltype(s);
    using net_t = decltype(nt);
    const auto src = views_of<true, state_t, net_t>((typename F::Inputs*)nullptr, in, std::make_index_sequence<NI>{});
    const auto dst = views_of<false, state_t, net_t>((typename F::Outputs*)nullptr, outs, std::make_index_sequence<NO>{});
    // the run over which the head parts are a fixed offset from the flat index: one sample
    const int64_t run = kPerSample<decltype(src)> ? n / in[0].size(0) : n;
    Loop::template launch<state_t>(F{}, coeffs, weights, src, dst, n, run);
  });
}

template <typename Loop>
void genie_step_out(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& head_out,
                    const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next) {
  check_genie_step(x_bar, eps, head_out, coeffs, x_bar_next, x_next);
  run_step<Loop, GenieStep>("genie_step", coeffs, {x_bar, eps, head_out}, {x_bar_next, x_next});
}

template <typename Loop>
std::tuple<at::Tensor, at::Tensor> genie_step(const at::Tensor& x_bar, const at::Tensor& eps,
                                              const at::Tensor& head_out, const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar), x_next = empty_contiguous(eps);
  genie_step_out<Loop>(x_bar, eps, head_out, coeffs, x_bar_next, x_next);
  return {x_bar_next, x_next};
}

template <typename Loop>
void ddim_step_out(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs, at::Tensor& x_bar_next,
                   at::Tensor& x_next) {
  check_ddim_step(x_bar, eps, coeffs, x_bar_next, x_next);
  run_step<Loop, DdimStep>("ddim_step", coeffs, {x_bar, eps}, {x_bar_next, x_next});
}

template <typename Loop>
std::tuple<at::Tensor, at::Tensor> ddim_step(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar), x_next = empty_contiguous(eps);
  ddim_step_out<Loop>(x_bar, eps, coeffs, x_bar_next, x_next);
  return {x_bar_next, x_next};
}

template <typename Loop>
void denoise_step_out(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs, at::Tensor& x0) {
  check_denoise_step(x_bar, eps, coeffs, x0);
  run_step<Loop, DenoiseStep>("denoise_step", coeffs, {x_bar, eps}, {x0});
}

template <typename Loop>
at::Tensor denoise_step(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs) {
  at::Tensor x0 = empty_contiguous(x_bar);
  denoise_step_out<Loop>(x_bar, eps, coeffs, x0);
  return x0;
}

template <typename Loop>
void dpmpp_2m_step_out(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& x0_prev,
                       const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next, at::Tensor& x0) {
  check_dpmpp_2m_step(x_bar, eps, x0_prev, coeffs, x_bar_next, x_next, x0);
  run_step<Loop, Dpmpp2mStep>("dpmpp_2m_step", coeffs, {x_bar, eps, x0_prev}, {x_bar_next, x_next, x0});
}

template <typename Loop>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dpmpp_2m_step(const at::Tensor& x_bar, const at::Tensor& eps,
                                                             const at::Tensor& x0_prev, const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar), x_next = empty_contiguous(eps), x0 = empty_contiguous(x_bar);
  dpmpp_2m_step_out<Loop>(x_bar, eps, x0_prev, coeffs, x_bar_next, x_next, x0);
  return {x_bar_next, x_next, x0};
}

template <typename Loop>
void genie_multistep_step_out(const at::Tensor& x_bar, const at::Tensor& x_bar_eval, const at::Tensor& eps,
                              const at::Tensor& head_out, const at::Tensor& x0_hist, const at::Tensor& d_hist,
                              const at::Tensor& weights, const at::Tensor& coeffs, at::Tensor& x_bar_next,
                              at::Tensor& x_bar_pred, at::Tensor& x_pred, at::Tensor& x0, at::Tensor& d) {
  check_genie_multistep_step(x_bar, x_bar_eval, eps, head_out, x0_hist, d_hist, weights, coeffs, x_bar_next,
                             x_bar_pred, x_pred, x0, d);
  run_step<Loop, GenieMultistepStep>("genie_multistep_step", coeffs,
                                     {x_bar, eps, x_bar_eval, head_out, x0_hist, d_hist},
                                     {x_bar_next, x_bar_pred, x_pred, x0, d}, weights);
}

template <typename Loop>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> genie_multistep_step(
    const at::Tensor& x_bar, const at::Tensor& x_bar_eval, const at::Tensor& eps, const at::Tensor& head_out,
    const at::Tensor& x0_hist, const at::Tensor& d_hist, const at::Tensor& weights, const at::Tensor& coeffs) {
  at::Tensor x_bar_next = empty_contiguous(x_bar), x_bar_pred = empty_contiguous(x_bar),
             x_pred = empty_contiguous(eps), x0 = empty_contiguous(x_bar), d = empty_contiguous(x_bar);
  genie_multistep_step_out<Loop>(x_bar, x_bar_eval, eps, head_out, x0_hist, d_hist, weights, coeffs, x_bar_next,
                                 x_bar_pred, x_pred, x0, d);
  return {x_bar_next, x_bar_pred, x_pred, x0, d};
}

}  // namespace genie_fast
