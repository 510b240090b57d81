// The CPU loop of the step ops (CpuLoop): one pass over the flat index with at::parallel_for;
// inside a chunk, a SIMD loop over each run that stays within one sample (so a head part is a
// fixed offset from the flat index), compiled for the baseline ISA and for AVX2+FMA. The
// <op>_cpu.cpp files register `<op>_out<CpuLoop>` (step_ops.h) as the op's CPU kernel.
#pragma once
#if defined(__CUDACC__)
#error "step_cpu.h is the CPU loop; CUDA sources include cuda/step_cuda.cuh"
#endif
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstddef>
#include <tuple>
#include <utility>

#include "step_ops.h"

// --------------------------------------------------------------------------- CPU ISA variants
// The extension is built for the baseline x86-64 ISA (SSE2), while ATen's own CPU kernels pick
// AVX2/AVX-512 at run time. The CPU step loops are therefore compiled twice, for the baseline and
// for AVX2+FMA, and the AVX2 copy runs where the CPU has it (checked once).
#if defined(__x86_64__) && defined(__GNUC__)
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

// --------------------------------------------------------------------------- CPU loop
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
