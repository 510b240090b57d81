// The CUDA loop of the step ops (CudaLoop): one pass, grid-stride, 4-wide vector loads and
// stores when every pointer allows, and the coefficient row read on the device. Every launch goes
// on the current stream and nothing here syncs the host, so the ops can be captured in a CUDA graph.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include "../step_ops.h"

namespace genie_fast {
namespace cuda {

constexpr int kThreads = 256;
// 4 elements per thread: 16-byte loads of a float32 state. A kernel takes the vector path when
// every pointer is aligned for it (checked on the host), else its scalar loop covers everything.
constexpr int kVec = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

template <typename T>
inline bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

// Enough blocks to fill the device (8 blocks of 256 threads per SM), fewer for small tensors;
// the kernels loop grid-stride over the rest.
inline int num_blocks(int64_t work_items) {
  static int sm_count[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 64 && sm_count[dev] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count[dev], cudaDevAttrMultiProcessorCount, dev));
  }
  const int64_t max_blocks = int64_t(dev < 64 ? sm_count[dev] : 132) * 8;
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min(want, max_blocks)));
}

// The coefficient row as the kernels take it: a float32 or float64 pointer chosen at run time
// (one uniform branch per thread; it halves the kernel instantiations and the compile time), and
// the weight vector of a formula that has one (any float dtype, also chosen at run time).
struct CoeffRow {
  enum Kind : int { kF64, kF32, kF16, kBF16 };
  const void* ptr;
  bool is_double;
  int64_t stride;
  const void* w_ptr;  // null without weights
  Kind w_kind;
  int64_t w_stride;
};

inline CoeffRow coeff_row(const at::Tensor& coeffs, const at::Tensor& weights) {
  CoeffRow c{coeffs.data_ptr(), coeffs.scalar_type() == at::kDouble, coeffs.stride(0), nullptr, CoeffRow::kF64, 0};
  if (weights.defined()) {
    c.w_ptr = weights.data_ptr();
    c.w_stride = weights.stride(0);
    switch (weights.scalar_type()) {
      case at::kDouble: c.w_kind = CoeffRow::kF64; break;
      case at::kFloat: c.w_kind = CoeffRow::kF32; break;
      case at::kHalf: c.w_kind = CoeffRow::kF16; break;
      case at::kBFloat16: c.w_kind = CoeffRow::kBF16; break;
      default: TORCH_CHECK(false, "genie_fast: unsupported weights dtype ", weights.scalar_type());
    }
  }
  return c;
}

template <typename op_t>
__device__ __forceinline__ op_t load_weight(const CoeffRow& c, int i) {
  const int64_t j = i * c.w_stride;
  switch (c.w_kind) {
    case CoeffRow::kF64: return op_t(static_cast<const double*>(c.w_ptr)[j]);
    case CoeffRow::kF32: return op_t(static_cast<const float*>(c.w_ptr)[j]);
    case CoeffRow::kF16: return op_t(float(static_cast<const c10::Half*>(c.w_ptr)[j]));
    default: return op_t(float(static_cast<const c10::BFloat16*>(c.w_ptr)[j]));
  }
}

template <typename op_t, int NW>
__device__ __forceinline__ StepConsts<op_t, NW> load_consts(const CoeffRow& c) {
  StepConsts<op_t, NW> k;
  static_cast<StepCoeffs<op_t>&>(k) =
      c.is_double ? genie_fast::load_coeffs<op_t>(static_cast<const double*>(c.ptr), c.stride)
                  : genie_fast::load_coeffs<op_t>(static_cast<const float*>(c.ptr), c.stride);
  if constexpr (NW > 0) {
#pragma unroll
    for (int i = 0; i < NW; ++i) k.weights[i] = load_weight<op_t>(c, i);
  }
  return k;
}

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

// Formula f over the accessors `in` into `out`, n elements. run: the elements of one sample
// (read when a head part moves with the sample index). vec: every vector pointer is aligned and a
// vector never straddles two samples (checked on the host), else the scalar loop covers all.
template <typename op_t, int NW, typename F, typename In, typename Out, size_t... a, size_t... o>
__device__ __forceinline__ void step_elements(const F& f, const StepConsts<op_t, NW>& k, const In& in, const Out& out,
                                              int64_t n, int64_t run, bool vec, std::index_sequence<a...>,
                                              std::index_sequence<o...>) {
  const int64_t n_vec = vec ? n / kVec : 0;
  for (int64_t v = global_thread(); v < n_vec; v += grid_threads()) {
    const int64_t i = v * kVec, b = kPerSample<In> ? i / run : 0;
    const auto x = std::make_tuple(load_vec<kVec>(std::get<a>(in).at(i, b))...);
    std::tuple<Vec<out_t<Out, o>, kVec>...> y;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const Vals<op_t, sizeof...(o)> r = f(k, op_t(std::get<a>(x).v[j])...);
      ((std::get<o>(y).v[j] = out_t<Out, o>(r.v[o])), ...);
    }
    (store_vec<kVec>(std::get<o>(out).at(i, b), std::get<o>(y)), ...);
  }
  for (int64_t i = n_vec * kVec + global_thread(); i < n; i += grid_threads()) {
    const int64_t b = kPerSample<In> ? i / run : 0;
    const Vals<op_t, sizeof...(o)> r = f(k, op_t(*std::get<a>(in).at(i, b))...);
    ((*std::get<o>(out).at(i, b) = out_t<Out, o>(r.v[o])), ...);
  }
}

template <typename op_t, typename F, typename In, typename Out>
__global__ void step_kernel(F f, CoeffRow c, In in, Out out, int64_t n, int64_t run, bool vec) {
  step_elements(f, load_consts<op_t, kWeightsOf<F>>(c), in, out, n, run, vec,
                std::make_index_sequence<std::tuple_size_v<In>>{}, std::make_index_sequence<std::tuple_size_v<Out>>{});
}

template <typename... A>
bool all_vec_aligned(const std::tuple<A...>& t) {
  return std::apply([](const auto&... a) { return (vec_aligned(a.at(0, 0)) && ...); }, t);
}

struct CudaLoop {
  using Guard = c10::cuda::OptionalCUDAGuard;
  template <typename op_t, typename F, typename In, typename Out>
  static void launch(const F& f, const at::Tensor& coeffs, const at::Tensor& weights, const In& in, const Out& out,
                     int64_t n, int64_t run) {
    const bool vec = all_vec_aligned(in) && all_vec_aligned(out) && (!kPerSample<In> || run % kVec == 0);
    step_kernel<op_t><<<num_blocks(vec ? n / kVec : n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        f, coeff_row(coeffs, weights), in, out, n, run, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace cuda
}  // namespace genie_fast
