// What the CPU and CUDA backends share around the formulas (step_formulas.h): each tensor's
// accessors in its role, the dtype dispatch, `run_step` (checks done: formula F over the inputs
// into the outputs with a backend's Loop) and the registered `<op>_out` ops, templated on the Loop
// (CpuLoop in step_cpu.h, cuda::CudaLoop in cuda/step_cuda.cuh). The ops write into preallocated
// outputs; genie_fast/ops.py allocates them for its functional API.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "step_checks.h"
#include "step_formulas.h"

namespace genie_fast {

// F::kWeights, or 0 for a formula that declares none.
template <typename F, typename = void>
struct WeightsOf : std::integral_constant<int, 0> {};
template <typename F>
struct WeightsOf<F, std::void_t<decltype(F::kWeights)>> : std::integral_constant<int, F::kWeights> {};
template <typename F>
constexpr int kWeightsOf = WeightsOf<F>::value;

// --------------------------------------------------------------------------- accessors
// Where a formula's inputs and outputs live: everything else (the casts to op_t and back, the
// parallel loop, vector loads, the launch) is one loop per backend.

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

// --------------------------------------------------------------------------- the registered ops
// The `<op>_out` form of each step op for a backend's Loop: the checks, then run_step.

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
void ddim_step_out(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs, at::Tensor& x_bar_next,
                   at::Tensor& x_next) {
  check_ddim_step(x_bar, eps, coeffs, x_bar_next, x_next);
  run_step<Loop, DdimStep>("ddim_step", coeffs, {x_bar, eps}, {x_bar_next, x_next});
}

template <typename Loop>
void denoise_step_out(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& coeffs, at::Tensor& x0) {
  check_denoise_step(x_bar, eps, coeffs, x0);
  run_step<Loop, DenoiseStep>("denoise_step", coeffs, {x_bar, eps}, {x0});
}

template <typename Loop>
void dpmpp_2m_step_out(const at::Tensor& x_bar, const at::Tensor& eps, const at::Tensor& x0_prev,
                       const at::Tensor& weights, const at::Tensor& coeffs, at::Tensor& x_bar_next, at::Tensor& x_next,
                       at::Tensor& x0) {
  check_dpmpp_2m_step(x_bar, eps, x0_prev, weights, coeffs, x_bar_next, x_next, x0);
  run_step<Loop, Dpmpp2mStep>("dpmpp_2m_step", coeffs, {x_bar, eps, x0_prev}, {x_bar_next, x_next, x0}, weights);
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

}  // namespace genie_fast
