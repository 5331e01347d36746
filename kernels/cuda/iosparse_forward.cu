// On-chip CUDA executor of a compiled program (docs/program-format.md, docs/gpu.md).
//
// The counterpart of the Triton kernel with the M slots in *shared memory*, which CUDA (unlike Triton)
// can index at run time. One block per batch tile of blockDim.x columns, one thread per column: every
// thread runs the whole op stream for its own column, so a thread only ever reads the slot and slow
// elements it wrote itself and no barrier is needed. The op stream is read by all threads of a warp
// at the same address (a broadcast). Partial sums stay in a register; accumulation is float32 for
// float, half and bfloat16 inputs.
//
// Not part of the extension (setup.py skips kernels/cuda): build_cuda_cxx in
// torch_iosparse/backends/cuda/gpu.py compiles it on demand with nvcc and loads it with ctypes
// (gpu.CudaCxxForward); tests/backends/cuda/test_cuda_cpp_compile.py compile-checks it with `nvcc -arch=sm_90`.
// Plain CUDA with an extern "C" launcher (no torch headers) so that needs only nvcc.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace iosparse_cuda {

enum Opcode : int32_t { LOAD = 1, FMA = 2, FINISH = 3, STORE = 4 };
// activations.KINDS: identity, relu, hardtanh, gelu, gelu_tanh, tanh, sigmoid (append only)
enum Act : int32_t { IDENTITY = 0, RELU = 1, HARDTANH = 2, GELU = 3, GELU_TANH = 4, TANH = 5, SIGMOID = 6 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float activate(float x, int code, float lo, float hi) {
  switch (code) {
    case RELU: return fmaxf(x, 0.f);
    case HARDTANH: return fminf(fmaxf(x, lo), hi);
    case GELU: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case TANH: return tanhf(x);
    case SIGMOID: return 1.f / (1.f + __expf(-x));
    default: return x;
  }
}

// x: [B, n_inputs] (strides sxb, sxf); y: [B, n_outputs] (strides syb, syf); slow: [n_slow, B] float.
// out_col_of_row: [n_slow], the output column a slow row holds, or -1.
template <typename T, typename W>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, const W* __restrict__ weight,
                               const W* __restrict__ bias, float* __restrict__ slow,
                               const int32_t* __restrict__ ops, const int64_t* __restrict__ op_ptr,
                               const int64_t* __restrict__ neuron, const int8_t* __restrict__ act_code,
                               const float* __restrict__ act_lo, const float* __restrict__ act_hi,
                               const int32_t* __restrict__ out_col_of_row, int64_t B, int32_t n_inputs,
                               int64_t n_computed, int64_t sxb, int64_t sxf, int64_t syb, int64_t syf) {
  extern __shared__ float slots[];  // [M][blockDim.x]
  const int lane = threadIdx.x;
  const int bt = blockDim.x;
  const int64_t col = (int64_t)blockIdx.x * bt + lane;
  const bool live = col < B;
  for (int64_t i = 0; i < n_computed; ++i) {
    float acc = to_float(bias[neuron[i]]);
    const int64_t end = op_ptr[i + 1];
    for (int64_t k = op_ptr[i]; k < end; ++k) {
      const int32_t code = ops[3 * k], a = ops[3 * k + 1], b = ops[3 * k + 2];
      if (code == FMA) {
        acc = fmaf(to_float(weight[b]), slots[a * bt + lane], acc);
      } else if (code == LOAD) {
        float v = 0.f;
        if (live) v = a < n_inputs ? to_float(x[col * sxb + (int64_t)a * sxf]) : slow[(int64_t)a * B + col];
        slots[b * bt + lane] = v;
      } else if (code == FINISH) {
        slots[a * bt + lane] = activate(acc, act_code[i], act_lo[i], act_hi[i]);
      } else {  // STORE
        const float v = slots[a * bt + lane];
        if (live) {
          slow[(int64_t)b * B + col] = v;
          const int32_t oc = out_col_of_row[b];
          if (oc >= 0) y[col * syb + (int64_t)oc * syf] = from_float<T>(v);
        }
      }
    }
  }
}

template <typename T>
static cudaError_t launch_typed(const void* x, void* y, const void* weight, const void* bias, int weight_is_input_type,
                                float* slow, const int32_t* ops, const int64_t* op_ptr, const int64_t* neuron,
                                const int8_t* act_code, const float* act_lo, const float* act_hi,
                                const int32_t* out_col_of_row, int64_t B, int32_t n_inputs, int64_t n_computed,
                                int32_t memory, int32_t batch_tile, int64_t sxb, int64_t sxf, int64_t syb,
                                int64_t syf, cudaStream_t stream) {
  const size_t smem = (size_t)memory * batch_tile * sizeof(float);
  const unsigned grid = (unsigned)((B + batch_tile - 1) / batch_tile);
  if (weight_is_input_type) {
    auto kern = forward_kernel<T, T>;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    kern<<<grid, batch_tile, smem, stream>>>((const T*)x, (T*)y, (const T*)weight, (const T*)bias, slow, ops, op_ptr,
                                             neuron, act_code, act_lo, act_hi, out_col_of_row, B, n_inputs,
                                             n_computed, sxb, sxf, syb, syf);
  } else {
    auto kern = forward_kernel<T, float>;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    kern<<<grid, batch_tile, smem, stream>>>((const T*)x, (T*)y, (const float*)weight, (const float*)bias, slow, ops,
                                             op_ptr, neuron, act_code, act_lo, act_hi, out_col_of_row, B,
                                             n_inputs, n_computed, sxb, sxf, syb, syf);
  }
  return cudaGetLastError();
}

}  // namespace iosparse_cuda

// dtype: 0 = float32, 1 = float16, 2 = bfloat16 (of x and y). weight/bias are float32, or of x's dtype
// when weight_is_input_type. Returns a cudaError_t (0 = success); cudaErrorInvalidValue for bad sizes.
extern "C" int iosparse_cuda_forward(int dtype, const void* x, void* y, const void* weight, const void* bias,
                                     int weight_is_input_type, float* slow, const int32_t* ops,
                                     const int64_t* op_ptr, const int64_t* neuron, const int8_t* act_code,
                                     const float* act_lo, const float* act_hi, const int32_t* out_col_of_row,
                                     int64_t B, int32_t n_inputs, int64_t n_computed, int32_t memory,
                                     int32_t batch_tile, int64_t sxb, int64_t sxf, int64_t syb, int64_t syf,
                                     void* stream) {
  using namespace iosparse_cuda;
  if (B <= 0 || batch_tile <= 0 || batch_tile > 1024 || memory <= 0) return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  switch (dtype) {
    case 0: return (int)launch_typed<float>(x, y, weight, bias, weight_is_input_type, slow, ops, op_ptr, neuron, act_code,
                                            act_lo, act_hi, out_col_of_row, B, n_inputs, n_computed, memory,
                                            batch_tile, sxb, sxf, syb, syf, s);
    case 1: return (int)launch_typed<__half>(x, y, weight, bias, weight_is_input_type, slow, ops, op_ptr, neuron,
                                             act_code, act_lo, act_hi, out_col_of_row, B, n_inputs, n_computed,
                                             memory, batch_tile, sxb, sxf, syb, syf, s);
    case 2: return (int)launch_typed<__nv_bfloat16>(x, y, weight, bias, weight_is_input_type, slow, ops, op_ptr,
                                                    neuron, act_code, act_lo, act_hi, out_col_of_row, B, n_inputs,
                                                    n_computed, memory, batch_tile, sxb, sxf, syb, syf, s);
    default: return (int)cudaErrorInvalidValue;
  }
}
