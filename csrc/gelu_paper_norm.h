// Row passes of the gelu_paper_norm op: y = paper_layer_norm(dropout(GELU(x))) over the last
// dim, the normalisation of the paper code's input block (ConvRec(faithful=True)), where the
// composite of PyTorch ops makes about a dozen passes each way over a (positions, D + 3)
// tensor. One row is one position; like downscale.h this header includes no torch header and
// compiles for the CPU and the CUDA kernel, whose teams (one thread, one warp) it reuses.
#pragma once

#include "downscale.h"

namespace convrec {

// Per-row layout of the (rows, 2) statistics tensor the forward saves for the backward.
constexpr int kNormStatMean = 0;
constexpr int kNormStatRstd = 1;
constexpr int kNormStats = 2;

// Forward of row n: u = GELU(x) * dropout factor, y = weight * (u - mean(u)) * rstd + bias, rstd
// from Norm (the paper's form: 1 / (unbiased std + eps)). Saves mean and rstd.
template <typename T, typename A>
struct GeluPaperNormRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 2;  // D-vectors of scratch: u, dropout factors
  int64_t d;
  const T* x;
  Dropout<A> drop;
  const T* weight;
  const T* bias;
  Norm<A> norm;
  T* y;
  A* stats;

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch) const {
    A* u = scratch;
    const T* xr = x + n * d;
    const A sum = channel_sum(team, d, drop, n, scratch + d, true, [=](int64_t c, A keep) {
      const A v = static_cast<A>(xr[c]);
      u[c] = v * gelu_cdf(v) * keep;
      return u[c];
    });
    const A mean = team.sum(sum) / A(d);
    A sq = A(0);
    CONVREC_SIMD_SUM(sq)
    for (int64_t c = team.lane(); c < d; c += Team::size) sq += (u[c] - mean) * (u[c] - mean);
    const A rstd = norm.rstd(team.sum(sq), d);
    T* yr = y + n * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size)
      yr[c] = static_cast<T>((u[c] - mean) * rstd * static_cast<A>(weight[c]) +
                             static_cast<A>(bias[c]));
    if (team.lane() == 0) {
      stats[n * kNormStats + kNormStatMean] = mean;
      stats[n * kNormStats + kNormStatRstd] = rstd;
    }
  }
};

// Backward of row n from its saved statistics: recomputes u and xhat, then the LayerNorm and
// GELU gradients (as EpilogueGradRow). Adds grad_y * xhat and grad_y to the partial sums of the
// weight (part.gamma) and bias (part.shift) gradients.
template <typename T, typename A>
struct GeluPaperNormGradRow {
  using acc = A;
  // D-vectors of scratch: weighted output gradient, xhat, Phi(x), dropout factors
  static constexpr int64_t scratch_rows = 4;
  int64_t d;
  const T* grad_y;
  const T* x;
  Dropout<A> drop;
  const T* weight;
  const A* stats;
  Norm<A> norm;
  T* grad_x;

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch, Partials<A>& part) const {
    A* g = scratch;
    A* xhat = scratch + d;
    A* cdf = scratch + 2 * d;
    A* factor = scratch + 3 * d;
    const A mean = stats[n * kNormStats + kNormStatMean];
    const A rstd = stats[n * kNormStats + kNormStatRstd];
    const T* xr = x + n * d;
    const T* gy = grad_y + n * d;
    const T* w = weight;
    A* pg = part.gamma;
    A* ps = part.shift;
    const A s1 = channel_sum(team, d, drop, n, factor, true, [=](int64_t c, A keep) {
      const A v = static_cast<A>(xr[c]);
      cdf[c] = gelu_cdf(v);
      xhat[c] = (v * cdf[c] * keep - mean) * rstd;
      const A go = static_cast<A>(gy[c]);
      pg[c] += go * xhat[c];
      ps[c] += go;
      g[c] = go * static_cast<A>(w[c]);
      return g[c];
    });
    const NormGradSums<A> ln = norm_grad_sums(team, d, g, xhat, s1, norm, rstd);
    const A mean_g = ln.mean_g, coefficient = ln.coefficient;
    T* gx = grad_x + n * d;
    channel_sum(team, d, drop, n, factor, false, [=](int64_t c, A keep) {
      const A du = rstd * (g[c] - mean_g - xhat[c] * coefficient);
      gx[c] = static_cast<T>(du * keep * gelu_grad(static_cast<A>(xr[c]), cdf[c]));
      return A(0);
    });
  }
};

}  // namespace convrec
