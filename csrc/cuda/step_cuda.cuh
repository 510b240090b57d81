// Launch helpers shared by the CUDA step kernels: vector loads, grid-stride sizing, the
// coefficient dtype switch. Every launch goes on the current stream and nothing here syncs the
// host, so the ops can be captured in a CUDA graph.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../step_common.h"

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
// (one uniform branch per thread; it halves the kernel instantiations and the compile time).
struct CoeffRow {
  const void* ptr;
  bool is_double;
  int64_t stride;
};

inline CoeffRow coeff_row(const at::Tensor& coeffs) {
  return {coeffs.data_ptr(), coeffs.scalar_type() == at::kDouble, coeffs.stride(0)};
}

template <typename op_t>
__device__ __forceinline__ StepCoeffs<op_t> load_coeffs(const CoeffRow& c) {
  return c.is_double ? genie_fast::load_coeffs<op_t>(static_cast<const double*>(c.ptr), c.stride)
                     : genie_fast::load_coeffs<op_t>(static_cast<const float*>(c.ptr), c.stride);
}

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

}  // namespace cuda
}  // namespace genie_fast
