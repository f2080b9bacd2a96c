// The kernel library's public C++ API (no Python, no torch): validation, threading, dtype
// conversion and bias around the per-ISA kernels. bindings.cpp and the C++ tests call this.
#pragma once
#include <cstdint>

#include "kernel_api.h"

namespace lowbit {

struct LinearArgs {
  QWeight w;
  const void* x;    // [M, K] activations, row stride ldx elements, inner stride 1
  DType x_dtype;
  int64_t M;
  int64_t ldx;
  const float* bias;  // float32 [N] or nullptr
  void* y;          // [M, N] output, row stride ldy elements
  DType y_dtype;
  int64_t ldy;
  int n_threads;
};

// Throws std::invalid_argument naming the first inconsistent field.
void validate(const QWeight& w);

// y = x @ dequant(W)^T (+ bias), float32 accumulation. `table` defaults to the active ISA.
void linear(const LinearArgs& a, const KernelTable* table = nullptr);

// out[n, k] = dequant(W)[n, k] in dtype `out_dtype`, row stride ldo elements.
void dequantize(const QWeight& w, void* out, DType out_dtype, int64_t ldo, int n_threads,
                const KernelTable* table = nullptr);

}  // namespace lowbit
