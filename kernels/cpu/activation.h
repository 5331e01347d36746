// Activations of torch_iosparse (codes: torch_iosparse/abi.py::ActCode; append only).
// Formulas follow PyTorch: gelu = x/2 (1 + erf(x/sqrt 2)), gelu_tanh = x/2 (1 + tanh(sqrt(2/pi) (x +
// 0.044715 x^3))). NaN passes through every activation, as it does in PyTorch.
#pragma once
#include <cmath>
#include <cstdint>

namespace iosparse {

enum ActCode : int8_t { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_HARDTANH = 2, ACT_GELU = 3, ACT_GELU_TANH = 4,
                        ACT_TANH = 5, ACT_SIGMOID = 6, ACT_COUNT = 7 };

template <typename T>
inline T act_scalar(int8_t code, T x, T lo, T hi) {
  switch (code) {
    case ACT_IDENTITY: return x;
    case ACT_RELU: return x < T(0) ? T(0) : x;  // NaN < 0 is false: NaN passes
    case ACT_HARDTANH: return x < lo ? lo : (x > hi ? hi : x);
    case ACT_GELU: return T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2)));
    case ACT_GELU_TANH: {
      const T k = T(0.7978845608028654);  // sqrt(2/pi)
      return T(0.5) * x * (T(1) + std::tanh(k * (x + T(0.044715) * x * x * x)));
    }
    case ACT_TANH: return std::tanh(x);
    case ACT_SIGMOID: return T(1) / (T(1) + std::exp(-x));
    default: return x;
  }
}

// d act / d z at pre-activation z (PyTorch's conventions: relu'(0) = 0, hardtanh' = 0 at the bounds).
template <typename T>
inline T act_grad_scalar(int8_t code, T z, T lo, T hi) {
  switch (code) {
    case ACT_IDENTITY: return T(1);
    case ACT_RELU: return z > T(0) ? T(1) : T(0);
    case ACT_HARDTANH: return (z > lo && z < hi) ? T(1) : T(0);
    case ACT_GELU: {
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2)));
      const T pdf = std::exp(T(-0.5) * z * z) * T(0.3989422804014327);  // 1/sqrt(2 pi)
      return cdf + z * pdf;
    }
    case ACT_GELU_TANH: {
      const T k = T(0.7978845608028654), c = T(0.044715);
      const T inner = k * (z + c * z * z * z);
      const T t = std::tanh(inner);
      return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * k * (T(1) + T(3) * c * z * z);
    }
    case ACT_TANH: {
      const T t = std::tanh(z);
      return T(1) - t * t;
    }
    case ACT_SIGMOID: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) - s);
    }
    default: return T(1);
  }
}

// Apply in place to n contiguous values. The branch is hoisted out of the loop so the cheap kinds
// vectorise.
template <typename T>
inline void act_inplace(int8_t code, T* x, int64_t n, T lo, T hi) {
  switch (code) {
    case ACT_IDENTITY: return;
    case ACT_RELU:
      for (int64_t i = 0; i < n; ++i) x[i] = x[i] < T(0) ? T(0) : x[i];
      return;
    case ACT_HARDTANH:
      for (int64_t i = 0; i < n; ++i) x[i] = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
      return;
    default:
      for (int64_t i = 0; i < n; ++i) x[i] = act_scalar<T>(code, x[i], lo, hi);
  }
}

}  // namespace iosparse
