// Fused linear combination + transfer step on CPU, the twin of kernels/lincomb.py (formula and why there):
//   out  = (keep_x  ? x : 0) + (w[0]*x  + sum_j w[j+1]*v_j)
//   out2 = (keep_x2 ? x : 0) + (w2[0]*x + sum_j w2[j+1]*v_j)     (when out2 != 0)
//   out  = m*out + b[0]*k + b[1]*n                                 (when a blend is given: inpainting's)
// No torch headers: pndm_fast/ops.py passes data pointers, the element count and operand dtype codes, so the
// build needs only pybind11 and takes seconds. Plain -O3 -fopenmp; no -ffast-math, which would break NaN
// propagation and let the compiler reassociate the fp32 sum.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Mirrors of kernels/constants.py (MAX_OPERANDS, OPERAND_CODES, ABI_VERSION), exported below as MAX_OPERANDS,
// DTYPE_CODES and ABI_VERSION: pndm_fast/ops.py refuses this module when they differ from the Python constants.
constexpr int kMaxOperands = 5;
constexpr int kAbiVersion = 2;  // 2: the blend arguments
// Elements per inner block: 5 converted operands x 512 x 4 B = 10 KB of scratch, well inside a 32 KB L1.
constexpr int64_t kChunk = 512;
// Below 32k elements (128 KB of fp32, ~10 us of work) waking OpenMP threads costs more than it saves.
constexpr int64_t kParallelMin = 32768;

enum DTypeCode : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct Args {
  float* out;
  float* out2;  // nullptr when there is no second output
  const float* x;
  const void* v[kMaxOperands];
  int code[kMaxOperands];
  float w[kMaxOperands + 1];   // weights of x, v_0.. for out, rounded from the caller's float64
  float w2[kMaxOperands + 1];  // same for out2
  bool keep_x, keep_x2;
  const float* blend[3];  // mask, (1 - mask) image, (1 - mask) noise; unused without a blend
  float b[2];             // weights of the image and noise terms
};

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// bf16 is the upper half of an fp32: exact.
inline float bf16_to_f32(uint16_t h) { return from_bits(uint32_t(h) << 16); }

// Branch-free, so the loop vectorizes without F16C: move exponent+mantissa into fp32 position and scale by
// 2**112 = 2**(127-15), exact for normals and for fp16 subnormals (exponent 0 reads as an fp32 subnormal that
// the scaling makes normal). Exponent 31 (inf/NaN) gets the fp32 all-ones exponent, keeping the NaN payload.
inline float f16_to_f32(uint16_t h) {
  const uint32_t em = uint32_t(h & 0x7fffu) << 13;
  const uint32_t finite = to_bits(from_bits(em) * 0x1p112f);
  const uint32_t bits = em >= (0x7c00u << 13) ? (em | 0x7f800000u) : finite;
  return from_bits(bits | (uint32_t(h & 0x8000u) << 16));
}

template <typename Convert>
inline void convert(const uint16_t* src, float* dst, int64_t len, Convert f) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) dst[i] = f(src[i]);
}

// One block of `len` elements from `begin`; K operands, OUT2 whether out2 is written, BLEND whether out is
// blended. Templated so the j loop unrolls and the i loop vectorizes (one load per operand, K multiply-adds, one
// or two stores per element).
template <int K, bool OUT2, bool BLEND>
void run_block(const Args& a, int64_t begin, int64_t len, float (*scratch)[kChunk]) {
  const float* v[K + 1];
  for (int j = 0; j < K; ++j) {
    const uint16_t* half = static_cast<const uint16_t*>(a.v[j]) + begin;
    if (a.code[j] == kF32) {
      v[j] = static_cast<const float*>(a.v[j]) + begin;
    } else {
      if (a.code[j] == kBF16) convert(half, scratch[j], len, bf16_to_f32);
      else convert(half, scratch[j], len, f16_to_f32);
      v[j] = scratch[j];
    }
  }
  float w[K + 1], w2[K + 1];
  for (int j = 0; j <= K; ++j) {
    w[j] = a.w[j];
    w2[j] = a.w2[j];
  }
  const float* x = a.x + begin;
  float* out = a.out + begin;
  float* out2 = OUT2 ? a.out2 + begin : nullptr;
  const bool keep_x = a.keep_x, keep_x2 = a.keep_x2;
  const float* m = BLEND ? a.blend[0] + begin : nullptr;
  const float* known_image = BLEND ? a.blend[1] + begin : nullptr;
  const float* known_noise = BLEND ? a.blend[2] + begin : nullptr;
  const float b0 = a.b[0], b1 = a.b[1];
  // out or out2 may be x itself: each element is read before it is written, which simd vectorization preserves.
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float xi = x[i];
    float d = w[0] * xi;
    float d2 = w2[0] * xi;
    for (int j = 0; j < K; ++j) {
      const float vj = v[j][i];
      d += w[j + 1] * vj;
      if (OUT2) d2 += w2[j + 1] * vj;
    }
    if (OUT2) out2[i] = keep_x2 ? xi + d2 : d2;
    const float y = keep_x ? xi + d : d;
    // the Triton kernel's sums in its order (b0 k, + b1 n, m y added last); it fuses them into fma, so the two
    // agree to float32 rounding
    out[i] = BLEND ? m[i] * y + (b1 * known_noise[i] + b0 * known_image[i]) : y;
  }
}

using BlockFn = void (*)(const Args&, int64_t, int64_t, float (*)[kChunk]);

template <bool OUT2, bool BLEND>
BlockFn pick(int k) {
  switch (k) {
    case 0: return run_block<0, OUT2, BLEND>;
    case 1: return run_block<1, OUT2, BLEND>;
    case 2: return run_block<2, OUT2, BLEND>;
    case 3: return run_block<3, OUT2, BLEND>;
    case 4: return run_block<4, OUT2, BLEND>;
    default: return run_block<5, OUT2, BLEND>;
  }
}

void run(const Args& a, int k, int64_t n, bool blend) {
  const BlockFn block = a.out2 ? (blend ? pick<true, true>(k) : pick<true, false>(k))
                               : (blend ? pick<false, true>(k) : pick<false, false>(k));
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t c = 0; c < chunks; ++c) {
    alignas(64) float scratch[kMaxOperands][kChunk];
    const int64_t begin = c * kChunk;
    block(a, begin, n - begin < kChunk ? n - begin : kChunk, scratch);
  }
}

void lincomb(uintptr_t out, uintptr_t x, const std::vector<uintptr_t>& operands, const std::vector<int>& codes,
             int64_t n, const std::vector<double>& weights, bool keep_x, uintptr_t out2,
             const std::vector<double>& weights2, bool keep_x2, const std::vector<uintptr_t>& blend,
             const std::vector<double>& blend_weights) {
  const size_t k = operands.size();
  if (k > kMaxOperands)
    throw std::invalid_argument("at most " + std::to_string(kMaxOperands) + " operands, got " + std::to_string(k));
  if (codes.size() != k) throw std::invalid_argument("one dtype code per operand");
  if (weights.size() != k + 1) throw std::invalid_argument("need len(operands)+1 weights");
  if (out2 && weights2.size() != k + 1) throw std::invalid_argument("need len(operands)+1 weights2");
  if (n < 0 || !out || !x) throw std::invalid_argument("bad out/x pointer or element count");
  if (!(blend.empty() || blend.size() == 3) || blend_weights.size() != blend.size() / 3 * 2)
    throw std::invalid_argument("a blend is 3 pointers (mask, image, noise) and 2 weights, or none");
  Args a{};
  a.out = reinterpret_cast<float*>(out);
  a.out2 = reinterpret_cast<float*>(out2);
  a.x = reinterpret_cast<const float*>(x);
  for (size_t j = 0; j < k; ++j) {
    if (codes[j] < kF32 || codes[j] > kF16) throw std::invalid_argument("dtype codes: 0 (f32), 1 (bf16), 2 (f16)");
    a.v[j] = reinterpret_cast<const void*>(operands[j]);
    a.code[j] = codes[j];
  }
  for (size_t j = 0; j <= k; ++j) {
    a.w[j] = static_cast<float>(weights[j]);
    a.w2[j] = out2 ? static_cast<float>(weights2[j]) : 0.0f;
  }
  a.keep_x = keep_x;
  a.keep_x2 = keep_x2;
  for (size_t j = 0; j < blend.size(); ++j) a.blend[j] = reinterpret_cast<const float*>(blend[j]);
  for (size_t j = 0; j < blend_weights.size(); ++j) a.b[j] = static_cast<float>(blend_weights[j]);
  py::gil_scoped_release release;  // pure pointer work from here on; other Python threads may run
  run(a, static_cast<int>(k), n, !blend.empty());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pndm_fast CPU kernels (pybind11 + OpenMP, no torch headers); private: call pndm_fast.ops.lincomb";
  m.attr("MAX_OPERANDS") = kMaxOperands;
  py::dict codes;
  codes["float32"] = int(kF32);
  codes["bfloat16"] = int(kBF16);
  codes["float16"] = int(kF16);
  m.attr("DTYPE_CODES") = codes;
  m.attr("ABI_VERSION") = kAbiVersion;
  m.def("lincomb", &lincomb, py::arg("out"), py::arg("x"), py::arg("operands"), py::arg("codes"), py::arg("n"),
        py::arg("weights"), py::arg("keep_x"), py::arg("out2"), py::arg("weights2"), py::arg("keep_x2"),
        py::arg("blend"), py::arg("blend_weights"),
        "out[, out2] <- (x if keep_x else 0) + w[0]*x + sum_j w[j+1]*v_j over n elements, then out <- m*out + "
        "b[0]*k + b[1]*n when blend = [m, k, n] (float32 pointers) is not empty; pointers are ints, "
        "operand dtype codes 0=f32 1=bf16 2=f16, out2=0 for none. Unchecked raw pointers: the caller "
        "(pndm_fast.ops) checks shapes, dtypes, devices, layout and overlaps first.");
}
