// Shared arithmetic of the downscale op: one definition of every per-row step, compiled for the
// CPU kernel (g++) and the CUDA kernel (nvcc), so the CPU tests exercise the arithmetic the GPU
// runs. A row is one window (batch b, position w) of a level; a "team" works on it together:
// one thread on the CPU (SerialTeam), one warp on the GPU (WarpTeam in downscale_cuda.cu). A team
// member handles channels c = lane, lane + size, ... and only ever reads back what it wrote to
// scratch, so the only cross-lane step is team.sum.
//
// This header includes no torch header: T is the storage type (float, double, Half, BFloat16),
// A the accumulation type (float or double), converted with static_cast.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define CONVREC_HD __host__ __device__ __forceinline__
#define CONVREC_SIMD
#define CONVREC_SIMD_SUM(...)
#else
// Always inlined, so the per-ISA clones of the CPU row loops (downscale_cpu.cpp) compile it all.
#define CONVREC_HD inline __attribute__((always_inline))
// Channel loops are independent per channel: let the CPU compiler vectorise them (and their
// sums) without alias checks. Needs -fopenmp-simd (no OpenMP runtime).
#define CONVREC_PRAGMA(x) _Pragma(#x)
#define CONVREC_SIMD CONVREC_PRAGMA(omp simd)
#define CONVREC_SIMD_SUM(...) CONVREC_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#endif

namespace convrec {

// Per-row layout of the (rows, 3) statistics tensor: LayerNorm mean, 1/std, pool divisor.
constexpr int kStatMean = 0;
constexpr int kStatRstd = 1;
constexpr int kStatDiv = 2;
constexpr int kStats = 3;

// ---------------------------------------------------------------- geometry (schedule.py) ----

// Zeros prepended so the last window ends at the last input; one window when length < kernel.
CONVREC_HD int64_t left_pad(int64_t length, int64_t kernel, int64_t stride) {
  if (length < kernel) return kernel - length;
  const int64_t rem = (length - kernel) % stride;
  return rem == 0 ? 0 : stride - rem;
}

CONVREC_HD int64_t out_length(int64_t length, int64_t kernel, int64_t stride) {
  return (length + left_pad(length, kernel, stride) - kernel) / stride + 1;
}

// Windows [first, last] that contain padded position p (stride <= kernel: never empty).
CONVREC_HD int64_t first_window(int64_t p, int64_t kernel, int64_t stride) {
  return p < kernel ? 0 : (p - kernel) / stride + 1;
}

CONVREC_HD int64_t last_window(int64_t p, int64_t stride, int64_t windows) {
  const int64_t w = p / stride;
  return w < windows - 1 ? w : windows - 1;
}

// ------------------------------------------------------------------- elementwise math ----

// float32 exp and erf as branch-free polynomials, so the CPU loops vectorise and both devices
// run the same arithmetic; float64 uses the C library. The coefficients are weighted least-
// squares (Lawson) fits in float64 made for this file; tests/test_downscale.py checks that GELU
// and its derivative come out at least as accurate as PyTorch's own float32 GELU.
CONVREC_HD float bits_to_float(int32_t bits) {
#ifdef __CUDA_ARCH__
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// e^x: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 minimax polynomial (relative error
// 2e-9), 2^n through the exponent bits. Inputs are clamped to [-87, 88] (no inf, no denormals).
CONVREC_HD float exp_of(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shift) - shift;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 0.00138368419337094f;
  p = p * r + 0.00837481578172227f;
  p = p * r + 0.04166822564200007f;
  p = p * r + 0.16666420170187474f;
  p = p * r + 0.49999992079494643f;
  p = p * r + 1.0000000363230992f;
  p = p * r + 1.0000000005541878f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// erf(x) = x P(x^2) for |x| <= 0.875 (relative error 2e-10); beyond, erfc(|x|) =
// t exp(-x^2 + S(t)) with t = 1 / (1 + |x| / 2) and S a degree-6 polynomial (relative error of
// erfc 3e-8). |x| is clamped at 4, where erf is 1 in float32; NaN stays NaN.
CONVREC_HD float erf_of(float x) {
  const float a = x < 0.0f ? -x : x;
  const float z = a > 4.0f ? 4.0f : a;
  const float x2 = z * z;
  float p = 8.6755315615326400e-05f;
  p = p * x2 - 8.2111389193870177e-04f;
  p = p * x2 + 5.2067507986300610e-03f;
  p = p * x2 - 2.6861586262995035e-02f;
  p = p * x2 + 1.1283733037775132e-01f;
  p = p * x2 - 3.7612636069140143e-01f;
  p = p * x2 + 1.1283791668703098e+00f;
  const float small = z * p;
  const float t = 1.0f / (1.0f + 0.5f * z);
  const float u = (t - 0.5144927536231884f) * 5.52f;  // onto [-1, 1]
  float s = 2.8969832794045747e-06f;
  s = s * u + 5.352118809139865e-05f;
  s = s * u - 0.00014774460708882886f;
  s = s * u - 0.0022798050699895265f;
  s = s * u + 0.005673416283473981f;
  s = s * u + 0.2446623520603099f;
  s = s * u - 0.6522585518306924f;
  const float large = 1.0f - t * exp_of(s - x2);
  const float e = z <= 0.875f ? small : large;
  return x < 0.0f ? -e : e;
}

CONVREC_HD double erf_of(double x) {
#ifdef __CUDA_ARCH__
  return ::erf(x);
#else
  return std::erf(x);
#endif
}

CONVREC_HD double exp_of(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

CONVREC_HD float sqrt_of(float x) {
#ifdef __CUDA_ARCH__
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

CONVREC_HD double sqrt_of(double x) {
#ifdef __CUDA_ARCH__
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Exact GELU is y * Phi(y); its derivative is Phi(y) + y * phi(y).
template <typename A>
CONVREC_HD A gelu_cdf(A y) {
  return A(0.5) * (A(1) + erf_of(y * A(0.70710678118654752440)));
}

template <typename A>
CONVREC_HD A gelu_grad(A y, A cdf) {
  return cdf + y * A(0.39894228040143267794) * exp_of(A(-0.5) * y * y);
}

// Level mix before the LayerNorm: dropped GELU plus both pooled residuals.
template <typename A>
CONVREC_HD A residual_mix(A gelu, A alpha, A pooled, A beta, A residual) {
  return gelu + alpha * pooled + beta * residual;
}

// ----------------------------------------------------------------------------- dropout ----

// Dropout keep decisions from a counter-based hash of one seed, the twin of
// convrec/ops/stack_dropout.py (keep_mask): element (row n, channel c) of level l is kept when
// mix32(row_key(l, n) + c * kChannelStep) >> 8 is at least floor(p * 2^24). Nothing is stored:
// the forward and the backward recompute the same decisions.
CONVREC_HD uint32_t mix32(uint32_t x) {  // Wellons' lowbias32
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

constexpr uint32_t kLevelSalt = 0x9e3779b9u, kRowSalt = 0x85ebca6bu, kChannelStep = 0x7feb352du;

template <typename A>
struct Dropout {
  const int64_t* seed = nullptr;  // (2,) 32-bit words, or nullptr: no dropout
  int64_t level = 0;
  uint32_t threshold = 0;  // floor(p * 2^24)
  A scale = A(1);  // 1 / (1 - p)

  CONVREC_HD bool on() const { return seed != nullptr; }

  CONVREC_HD uint32_t row_key(int64_t n) const {
    const uint32_t key = mix32(static_cast<uint32_t>(seed[0]) ^
                               mix32(static_cast<uint32_t>(seed[1]) ^
                                     mix32(static_cast<uint32_t>(level) + kLevelSalt)));
    const uint64_t u = static_cast<uint64_t>(n);
    return mix32(key ^ mix32(static_cast<uint32_t>(u) ^
                             mix32(static_cast<uint32_t>(u >> 32) + kRowSalt)));
  }

  // 1 / (1 - p) for a kept element, 0 for a dropped one, without a branch.
  CONVREC_HD A factor(uint32_t row_key, int64_t c) const {
    const uint32_t h = mix32(row_key + static_cast<uint32_t>(c) * kChannelStep);
    return static_cast<A>((h >> 8) >= threshold) * scale;
  }
};

// Runs body(c, dropout factor) over the team's channels of row n and sums what it returns.
// With dropout the factors live in `factor` (D values of scratch), so the main loop reads
// floats only and vectorises; `expand` hashes them there first, a later pass over the same row
// passes false and reuses them.
template <class Team, typename A, class Body>
CONVREC_HD A channel_sum(const Team& team, int64_t d, const Dropout<A>& drop, int64_t n,
                         A* factor, bool expand, Body body) {
  A sum = A(0);
  if (drop.on()) {
    if (expand) {
      const uint32_t key = drop.row_key(n);
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) factor[c] = drop.factor(key, c);
    }
    CONVREC_SIMD_SUM(sum)
    for (int64_t c = team.lane(); c < d; c += Team::size) sum += body(c, factor[c]);
  } else {
    CONVREC_SIMD_SUM(sum)
    for (int64_t c = team.lane(); c < d; c += Team::size) sum += body(c, A(1));
  }
  return sum;
}

// Row n of a (rows, D) tensor with dropout applied: the stack_dropout op (Dropout's decisions
// for `drop.level`, the same as convrec.ops.stack_dropout.keep_mask). Its own backward too:
// dropout multiplies by the same factors both ways.
template <typename T, typename A>
struct DropoutRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  int64_t d;
  Dropout<A> drop;
  const T* x;
  T* out;

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* /*scratch*/) const {
    const uint32_t key = drop.row_key(n);
    const T* in = x + n * d;
    T* o = out + n * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size)
      o[c] = static_cast<T>(static_cast<A>(in[c]) * drop.factor(key, c));
  }
};

// Pool divisor: the window size, or (mask-aware) the real positions in it, at least 1.
template <typename A>
CONVREC_HD A pool_divisor(bool mask_aware, int64_t real, int64_t kernel) {
  if (!mask_aware) return A(kernel);
  return A(real > 0 ? real : 1);
}

// The normalisation of a level: LayerNorm (biased variance, eps inside the square root) or,
// with `paper`, the paper code's (unbiased standard deviation, eps added to it; D >= 2), as
// convrec.ops.downscale.paper_layer_norm. Both are w * xhat + b with xhat = (m - mean) * rstd.
template <typename A>
struct Norm {
  A eps;
  bool paper;

  CONVREC_HD A rstd(A sum_sq, int64_t d) const {
    if (paper) return A(1) / (sqrt_of(sum_sq / A(d - 1)) + eps);
    return A(1) / sqrt_of(sum_sq / A(d) + eps);
  }

  // The coefficient of xhat in the gradient of the centred input,
  // dm = rstd * (g - mean(g) - xhat * coefficient), from sum(g * xhat). For the paper's form
  // d std / d m brings (std + eps) / ((D - 1) std) = 1 / ((D - 1)(1 - eps * rstd)); a row with
  // std = 0 has xhat = 0 and gets 0.
  CONVREC_HD A xhat_coefficient(A sum_g_xhat, A rstd, int64_t d) const {
    if (!paper) return sum_g_xhat / A(d);
    const A shrink = A(1) - eps * rstd;
    return shrink > A(0) ? sum_g_xhat / (A(d - 1) * shrink) : A(0);
  }
};

// The row reductions of a LayerNorm backward, from g (the output gradient times the weight; its
// sum over this lane's channels is `lane_sum_g`) and xhat: the mean of g and Norm's coefficient
// of xhat, so that the gradient of the centred input is rstd * (g - mean_g - xhat * coefficient).
template <typename A>
struct NormGradSums {
  A mean_g, coefficient;
};

template <class Team, typename A>
CONVREC_HD NormGradSums<A> norm_grad_sums(const Team& team, int64_t d, const A* g, const A* xhat,
                                          A lane_sum_g, const Norm<A>& norm, A rstd) {
  A sum_g_xhat = A(0);
  CONVREC_SIMD_SUM(sum_g_xhat)
  for (int64_t c = team.lane(); c < d; c += Team::size) sum_g_xhat += g[c] * xhat[c];
  return {team.sum(lane_sum_g) / A(d), norm.xhat_coefficient(team.sum(sum_g_xhat), rstd, d)};
}

// ------------------------------------------------------------------------ row passes ----

// Level geometry as the row passes see it.
struct Level {
  int64_t length;  // input positions
  int64_t windows;  // output positions
  int64_t kernel, stride, pad;
};

// One slot of level 0's window matrix: the input row when it is real, zeros otherwise.
template <class Team, typename T>
CONVREC_HD void fill_slot(const Team& team, T* dst, const T* row_or_null, int64_t d) {
  if (row_or_null != nullptr) {
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) dst[c] = row_or_null[c];
  } else {
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) dst[c] = T(0);
  }
}

// Forward, window pass of a level: window sums of the level input and of the long residual.
// Level 0 also builds the window matrix (B, windows, kernel, D) from x (masked, zero-padded);
// later levels read the window matrix the previous epilogue wrote.
template <typename T, typename A>
struct WindowRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 2;  // D-vectors of scratch: window sums of x and r
  Level lv;
  int64_t d;
  const T* seq;  // level 0: x (B, length, D); later levels: nullptr
  T* win;  // (B, windows, kernel, D): written at level 0 (unless nullptr: x is used in place)
  const T* res;  // long residual (B, length, D); nullptr at level 0 means "x itself"
  const bool* mask;  // (B, length) or nullptr: which inputs are real
  bool mask_residual;  // level 0: multiply an explicit residual by the mask (mask-aware)
  bool mask_aware;
  T* pooled;  // (B, windows, D)
  T* res_pooled;  // (B, windows, D): also the next level's long residual
  A* stats;  // (B * windows, kStats): writes the divisor
  bool* row_mask;  // (B, windows) or nullptr: window holds a real position

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch) const {
    const int64_t b = n / lv.windows, w = n % lv.windows, first = w * lv.stride - lv.pad;
    A* sx = scratch;
    A* sr = scratch + d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) sx[c] = sr[c] = A(0);
    int64_t real = 0;
    for (int64_t j = 0; j < lv.kernel; ++j) {
      const int64_t p = first + j;
      const bool inside = p >= 0 && p < lv.length;
      const bool keep = inside && (mask == nullptr || mask[b * lv.length + p]);
      real += keep ? 1 : 0;
      if (seq != nullptr && win != nullptr)  // level 0: build the window matrix
        fill_slot(team, win + (n * lv.kernel + j) * d,
                  keep ? seq + (b * lv.length + p) * d : nullptr, d);
      // level 0 sums the real inputs; later levels their window rows (zero where not real)
      if (seq != nullptr ? keep : inside) {
        const T* x = seq != nullptr ? seq + (b * lv.length + p) * d : win + (n * lv.kernel + j) * d;
        CONVREC_SIMD
        for (int64_t c = team.lane(); c < d; c += Team::size) sx[c] += static_cast<A>(x[c]);
      }
      if (res != nullptr && inside && (keep || !mask_residual)) {
        const T* r = res + (b * lv.length + p) * d;
        CONVREC_SIMD
        for (int64_t c = team.lane(); c < d; c += Team::size) sr[c] += static_cast<A>(r[c]);
      }
    }
    const A div = pool_divisor<A>(mask_aware, real, lv.kernel);
    const A* rsum = res != nullptr ? sr : sx;  // level 0 without a residual: it is x
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) {
      pooled[n * d + c] = static_cast<T>(sx[c] / div);
      res_pooled[n * d + c] = static_cast<T>(rsum[c] / div);
    }
    if (team.lane() == 0) {
      stats[n * kStats + kStatDiv] = div;
      if (row_mask != nullptr) row_mask[n] = real > 0;
    }
  }
};

// Level 0's window matrix alone (x masked and zero-padded): what the backward rebuilds when
// the forward read x in place but x is not zero at every masked position.
template <typename T, typename A>
struct WindowMatrixRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  Level lv;
  int64_t d;
  const T* seq;
  const bool* mask;
  T* win;

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* /*scratch*/) const {
    const int64_t b = n / lv.windows, first = (n % lv.windows) * lv.stride - lv.pad;
    for (int64_t j = 0; j < lv.kernel; ++j) {
      const int64_t p = first + j;
      const bool keep = p >= 0 && p < lv.length && (mask == nullptr || mask[b * lv.length + p]);
      fill_slot(team, win + (n * lv.kernel + j) * d,
                keep ? seq + (b * lv.length + p) * d : nullptr, d);
    }
  }
};

// Forward epilogue of a level, after the GEMM pre = windows @ W: bias, GELU, dropout, residual
// mix, LayerNorm, mask; writes the row into every window slot of the next level that holds it.
template <typename T, typename A>
struct EpilogueRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 2;  // D-vectors of scratch: the row, dropout factors
  int64_t windows, d;
  T* pre;  // (rows, D): GEMM result in, pre-activation (with bias) out
  const T* bias;  // (D,)
  Dropout<A> drop;
  const T* pooled;
  const T* res_pooled;
  const T* alpha;  // scalar
  const T* beta;  // scalar
  const T* gamma;  // (D,) LayerNorm weight
  const T* shift;  // (D,) LayerNorm bias
  Norm<A> norm;
  const bool* row_mask;  // (rows,) or nullptr
  A* stats;
  T* next_win;  // next level's window matrix or nullptr
  Level next;
  T* plain;  // (rows, D) level output or nullptr

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch) const {
    const A a = static_cast<A>(*alpha), bt = static_cast<A>(*beta);
    A* m = scratch;
    T* y_row = pre + n * d;
    const T* px = pooled + n * d;
    const T* pr = res_pooled + n * d;
    const T* bias_row = bias;
    // lambdas capture by value: pointers copied into them stay loop-invariant for the vectoriser
    const A sum = channel_sum(team, d, drop, n, scratch + d, true, [=](int64_t c, A factor) {
      // backward recomputes from the stored (rounded) pre-activation
      const T y_t = static_cast<T>(static_cast<A>(y_row[c]) + static_cast<A>(bias_row[c]));
      y_row[c] = y_t;
      const A y = static_cast<A>(y_t);
      m[c] = residual_mix(y * gelu_cdf(y) * factor, a, static_cast<A>(px[c]), bt,
                          static_cast<A>(pr[c]));
      return m[c];
    });
    const A mean = team.sum(sum) / A(d);
    A sq = A(0);
    CONVREC_SIMD_SUM(sq)
    for (int64_t c = team.lane(); c < d; c += Team::size) sq += (m[c] - mean) * (m[c] - mean);
    const A rstd = norm.rstd(team.sum(sq), d);
    const A on = row_mask == nullptr || row_mask[n] ? A(1) : A(0);
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size)
      m[c] = on * ((m[c] - mean) * rstd * static_cast<A>(gamma[c]) + static_cast<A>(shift[c]));
    if (team.lane() == 0) {
      stats[n * kStats + kStatMean] = mean;
      stats[n * kStats + kStatRstd] = rstd;
    }
    if (next_win != nullptr) {
      const int64_t b = n / windows, p = n % windows + next.pad;
      const int64_t hi = last_window(p, next.stride, next.windows);
      for (int64_t w = first_window(p, next.kernel, next.stride); w <= hi; ++w) {
        T* dst = next_win + ((b * next.windows + w) * next.kernel + p - w * next.stride) * d;
        CONVREC_SIMD
        for (int64_t c = team.lane(); c < d; c += Team::size) dst[c] = static_cast<T>(m[c]);
      }
    }
    if (plain != nullptr) {
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) plain[n * d + c] = static_cast<T>(m[c]);
    }
  }
};

// Batch row b of the position mean: mean over the last level's (real) positions.
template <typename T, typename A>
struct PositionMeanRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 1;  // D-vectors of scratch: the sum
  int64_t windows, d;
  const T* last;  // (B, windows, D)
  const bool* row_mask;  // (B, windows) or nullptr
  T* user;  // (B, D)
  A* denom;  // (B,)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t b, A* scratch) const {
    int64_t real = windows;
    if (row_mask != nullptr) {
      real = 0;
      for (int64_t t = 0; t < windows; ++t) real += row_mask[b * windows + t] ? 1 : 0;
    }
    const A div = A(real > 0 ? real : 1);
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) scratch[c] = A(0);
    for (int64_t t = 0; t < windows; ++t) {
      const T* src = last + (b * windows + t) * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) scratch[c] += static_cast<A>(src[c]);
    }
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size)
      user[b * d + c] = static_cast<T>(scratch[c] / div);
    if (team.lane() == 0) denom[b] = div;
  }
};

// Backward: what a level's windows send back to one position of its input. `grad_win` is the
// gradient of the window matrix (GEMM output), `grad_pooled` / `grad_res_pooled` those of the
// two pools; accumulates the gradient of the input and of the long residual at input position
// `position` of batch row b (before padding).
template <typename T, typename A>
struct WindowGrads {
  Level lv;
  const T* grad_win;  // (B, windows, kernel, D)
  const T* grad_pooled;  // (B, windows, D)
  const T* grad_res_pooled;  // (B, windows, D)
  const A* stats;  // divisors

  template <class Team>
  CONVREC_HD void gather(const Team& team, int64_t b, int64_t position, int64_t d, A* dx,
                         A* dr) const {
    const int64_t p = position + lv.pad;
    const int64_t hi = last_window(p, lv.stride, lv.windows);
    for (int64_t w = first_window(p, lv.kernel, lv.stride); w <= hi; ++w) {
      const int64_t row = b * lv.windows + w;
      const A div = stats[row * kStats + kStatDiv];
      const T* gw = grad_win + (row * lv.kernel + p - w * lv.stride) * d;
      const T* gp = grad_pooled + row * d;
      const T* gr = grad_res_pooled + row * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) {
        dx[c] += static_cast<A>(gw[c]) + static_cast<A>(gp[c]) / div;
        dr[c] += static_cast<A>(gr[c]) / div;
      }
    }
  }
};

// Per-team partial sums of the parameter gradients of one level, reduced after the pass.
template <typename A>
struct Partials {
  A* gamma;  // (D,)
  A* shift;  // (D,)
  A* bias;  // (D,)
  A alpha = A(0);
  A beta = A(0);
};

// Backward epilogue of a level: gathers the gradient of the row's output (from the next level,
// or the position mean at the last level, plus a returned-level gradient), then LayerNorm, mix,
// dropout and GELU backward. Writes the pre-activation gradient (the GEMM's input gradient) and
// the gradients of both pools; adds the parameter gradients to `part`. `Next` gathers the
// gradients of the row's output and long residual from what reads them: the next level's
// windows (WindowGrads) or, in the anchored stack, the positions of the next level
// (StreamGrads in stream_downscale.h).
template <typename T, typename A, class Next = WindowGrads<T, A>>
struct EpilogueGradRow {
  using acc = A;
  // D-vectors of scratch: output and residual gradients, xhat, Phi(y), dropout factors
  static constexpr int64_t scratch_rows = 5;
  int64_t windows, d;
  const T* pre;
  Dropout<A> drop;
  const T* pooled;
  const T* res_pooled;
  const T* alpha;
  const T* beta;
  const T* gamma;
  const A* stats;
  Norm<A> norm;
  const bool* row_mask;
  bool last;  // last level: the output gradient comes from the position mean
  const T* grad_user;  // (B, D) or nullptr (no gradient reached the user vector)
  const A* denom;  // (B,): position-mean divisors
  Next next;  // the next level's gradients, when not last
  const T* grad_plain;  // (rows, D) gradient of a returned level output, or nullptr
  T* grad_pre;
  T* grad_pooled;
  T* grad_res_pooled;

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch, Partials<A>& part) const {
    const int64_t b = n / windows;
    A* g_out = scratch;
    A* g_res = scratch + d;
    A* xhat = scratch + 2 * d;
    A* cdf = scratch + 3 * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) g_out[c] = g_res[c] = A(0);
    if (!last) {
      next.gather(team, b, n % windows, d, g_out, g_res);
    } else if (grad_user != nullptr) {
      const A div = denom[b];
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size)
        g_out[c] = static_cast<A>(grad_user[b * d + c]) / div;
    }
    if (grad_plain != nullptr) {
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size)
        g_out[c] += static_cast<A>(grad_plain[n * d + c]);
    }
    const A on = row_mask == nullptr || row_mask[n] ? A(1) : A(0);
    const A a = static_cast<A>(*alpha), bt = static_cast<A>(*beta);
    const A mean = stats[n * kStats + kStatMean], rstd = stats[n * kStats + kStatRstd];
    const T* y_row = pre + n * d;
    const T* px = pooled + n * d;
    const T* pr = res_pooled + n * d;
    A* pg = part.gamma;
    A* ps = part.shift;
    const T* weight = gamma;
    // recompute the normalised mix; LayerNorm backward needs sum(dxhat) and sum(dxhat * xhat)
    A* factor = scratch + 4 * d;
    const A s1 = channel_sum(team, d, drop, n, factor, true, [=](int64_t c, A keep) {
      const A y = static_cast<A>(y_row[c]);
      cdf[c] = gelu_cdf(y);
      const A m = residual_mix(y * cdf[c] * keep, a, static_cast<A>(px[c]), bt,
                               static_cast<A>(pr[c]));
      xhat[c] = (m - mean) * rstd;
      const A go = on * g_out[c];
      pg[c] += go * xhat[c];
      ps[c] += go;
      g_out[c] = go * static_cast<A>(weight[c]);
      return g_out[c];
    });
    const NormGradSums<A> ln = norm_grad_sums(team, d, g_out, xhat, s1, norm, rstd);
    const A mean_g = ln.mean_g, coefficient = ln.coefficient;
    T* gy = grad_pre + n * d;
    T* gp = grad_pooled + n * d;
    T* gr = grad_res_pooled + n * d;
    A* pb = part.bias;
    // dm: gradient of the mix; its dot products with the pools are the alpha / beta gradients
    const A sa = channel_sum(team, d, drop, n, factor, false, [=](int64_t c, A keep) {
      const A dm = rstd * (g_out[c] - mean_g - xhat[c] * coefficient);
      const A y = static_cast<A>(y_row[c]);
      const A dy = dm * keep * gelu_grad(y, cdf[c]);
      pb[c] += dy;
      gy[c] = static_cast<T>(dy);
      gp[c] = static_cast<T>(a * dm);
      gr[c] = static_cast<T>(bt * dm + g_res[c]);
      xhat[c] = dm;  // reused: dm, for the beta sum below
      return dm * static_cast<A>(px[c]);
    });
    A sb = A(0);
    CONVREC_SIMD_SUM(sb)
    for (int64_t c = team.lane(); c < d; c += Team::size) sb += xhat[c] * static_cast<A>(pr[c]);
    part.alpha += sa;
    part.beta += sb;
  }
};

// Backward of level 0's window pass: gradient of x (and of an explicit residual) at (b, p).
template <typename T, typename A>
struct InputGradRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 2;  // D-vectors of scratch: x and residual grads
  int64_t length, d;
  WindowGrads<T, A> first;
  const bool* mask;
  bool residual_is_x;
  bool mask_residual;
  T* grad_x;
  T* grad_res;  // nullptr when the residual is x

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch) const {
    const int64_t b = n / length, p = n % length;
    A* dx = scratch;
    A* dr = scratch + d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) dx[c] = dr[c] = A(0);
    first.gather(team, b, p, d, dx, dr);
    const A keep = mask == nullptr || mask[n] ? A(1) : A(0);
    const A with_res = residual_is_x ? A(1) : A(0);
    T* gx = grad_x + n * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size)
      gx[c] = static_cast<T>(keep * (dx[c] + with_res * dr[c]));
    if (grad_res != nullptr) {
      const A keep_res = mask_residual ? keep : A(1);
      T* gr = grad_res + n * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size)
        gr[c] = static_cast<T>(keep_res * dr[c]);
    }
  }
};

// ------------------------------------------------------------------- packed parameters ----

// Offsets of one level's tensors in the packed parameter vector, the twin of
// convrec/ops/level_params.py: conv weight (D, D/H, k), conv bias, Linear weight (D, D) and
// bias, alpha, beta, LayerNorm weight and bias, each row-major, levels one after another.
struct LevelLayout {
  int64_t conv_w, conv_b, lin_w, lin_b, alpha, beta, norm_w, norm_b, end;

  CONVREC_HD static LevelLayout at(int64_t base, int64_t d, int64_t heads, int64_t kernel) {
    LevelLayout o{};
    o.conv_w = base;
    o.conv_b = o.conv_w + d * (d / heads) * kernel;
    o.lin_w = o.conv_b + d;
    o.lin_b = o.lin_w + d * d;
    o.alpha = o.lin_b + d;
    o.beta = o.alpha + 1;
    o.norm_w = o.beta + 1;
    o.norm_b = o.norm_w + d;
    o.end = o.norm_b + d;
    return o;
  }
};

// Column c of the folded bias: Linear(conv bias) = linear bias + linear weight @ conv bias.
template <typename T, typename A>
struct FoldBiasCol {
  int64_t d;
  const T* conv_b;
  const T* lin_w;  // (D, D) [out, in]
  const T* lin_b;
  T* out;  // (D,)

  CONVREC_HD void operator()(int64_t c) const {
    A sum = static_cast<A>(lin_b[c]);
    for (int64_t i = 0; i < d; ++i)
      sum += static_cast<A>(lin_w[c * d + i]) * static_cast<A>(conv_b[i]);
    out[c] = static_cast<T>(sum);
  }
};

// Channel o of one level's slice of the packed gradient: row o of the conv weight and of the
// Linear weight, element o of both biases and of the LayerNorm weight and bias, and (o = 0)
// alpha and beta. From the row passes: `sums` holds the LayerNorm weight and bias, folded-bias,
// alpha and beta gradients ((3 * D + 2,): gamma, shift, bias, alpha, beta). From the GEMMs
// (unfold_level_grads): grad_conv, the conv weight's gradient in its packed (D, D/H * k)
// layout, and grad_lin_t, the Linear weight's gradient transposed ((D, D) [in, out]). The
// folded bias b = lb + Linear @ cb adds db ⊗ cb to the Linear weight's gradient and
// Linear^T @ db to the conv bias's.
template <typename T, typename A>
struct UnfoldLevelGrads {
  int64_t d, conv_row;  // conv_row = D/H * kernel: one output channel's conv weights
  LevelLayout at;  // offsets into `params` and `grad`
  const A* sums;
  const A* grad_conv;
  const A* grad_lin_t;
  const T* params;
  T* grad;

  CONVREC_HD void operator()(int64_t o) const {
    const A* db = sums + 2 * d;
    T* conv_out = grad + at.conv_w + o * conv_row;
    const A* conv_in = grad_conv + o * conv_row;
    for (int64_t i = 0; i < conv_row; ++i) conv_out[i] = static_cast<T>(conv_in[i]);
    A conv_bias = A(0);
    for (int64_t i = 0; i < d; ++i)
      conv_bias += static_cast<A>(params[at.lin_w + i * d + o]) * db[i];
    grad[at.conv_b + o] = static_cast<T>(conv_bias);
    for (int64_t c = 0; c < d; ++c)
      grad[at.lin_w + o * d + c] =
          static_cast<T>(grad_lin_t[c * d + o] + db[o] * static_cast<A>(params[at.conv_b + c]));
    grad[at.lin_b + o] = static_cast<T>(db[o]);
    grad[at.norm_w + o] = static_cast<T>(sums[o]);
    grad[at.norm_b + o] = static_cast<T>(sums[d + o]);
    if (o == 0) {
      grad[at.alpha] = static_cast<T>(sums[3 * d]);
      grad[at.beta] = static_cast<T>(sums[3 * d + 1]);
    }
  }
};

// GELU and its derivative at y[i] with the kernels' arithmetic (the gelu_points op, for tests).
template <typename T, typename A>
struct GeluPoints {
  const T* y;
  T* value;
  T* grad;

  CONVREC_HD void operator()(int64_t i) const {
    const A v = static_cast<A>(y[i]), cdf = gelu_cdf(v);
    value[i] = static_cast<T>(v * cdf);
    grad[i] = static_cast<T>(gelu_grad(v, cdf));
  }
};

// Partials view of slot i of the (slots, 3 * D + 2) table.
template <typename A>
CONVREC_HD Partials<A> partials_at(A* table, int64_t slot, int64_t d) {
  A* row = table + slot * (3 * d + 2);
  Partials<A> p;
  p.gamma = row;
  p.shift = row + d;
  p.bias = row + 2 * d;
  return p;
}

template <typename A>
CONVREC_HD void store_scalars(A* table, int64_t slot, int64_t d, A alpha, A beta) {
  A* row = table + slot * (3 * d + 2);
  row[3 * d] = alpha;
  row[3 * d + 1] = beta;
}

}  // namespace convrec
