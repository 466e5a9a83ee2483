// The gelu_paper_norm op (rows in gelu_paper_norm.h), written once for both devices like
// downscale_driver.h, whose checks, dropout and deterministic partial sums it shares.
#pragma once

#include <optional>
#include <tuple>

#include "downscale_driver.h"
#include "gelu_paper_norm.h"

namespace convrec {

// Checks x (..., D) and the (D,) weight and bias of one call; returns D. The paper's
// LayerNorm divides by D - 1, so D >= 2.
inline int64_t check_gelu_paper_norm(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  STD_TORCH_CHECK(x.dim() >= 1, "gelu_paper_norm: x must have at least one dimension");
  const int64_t d = x.size(x.dim() - 1);
  STD_TORCH_CHECK(d >= 2, "gelu_paper_norm: the last dimension of x must be at least 2, got ", d);
  check_tensor(weight, "weight", {d}, x.scalar_type(), x, "gelu_paper_norm");
  check_tensor(bias, "bias", {d}, x.scalar_type(), x, "gelu_paper_norm");
  return d;
}

// y = paper_layer_norm(dropout(GELU(x))) and the (rows, 2) row statistics the backward reads.
// With `dropout_seed` ((2,) int64) the dropout is StackDropout's level 0 over x's rows.
template <class Dev>
std::tuple<Tensor, Tensor> gelu_paper_norm(Tensor x, Tensor weight, Tensor bias,
                                           std::optional<Tensor> dropout_seed, double dropout,
                                           double eps) {
  Dev::check_dtype(x.scalar_type());
  const int64_t d = check_gelu_paper_norm(x, weight, bias);
  x = torch::stable::contiguous(x);
  weight = torch::stable::contiguous(weight);
  bias = torch::stable::contiguous(bias);
  const int64_t rows = x.numel() / d;
  Tensor y = torch::stable::empty_like(x);
  Tensor stats = torch::stable::new_empty(x, {rows, kNormStats}, acc_type(x.scalar_type()));
  if (rows == 0) return {y, stats};
  Dev dev(x);
  Dev::dispatch(x.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const Dropout<A> drop = check_dropout<A>(dropout_seed, dropout, x, "gelu_paper_norm");
    const Norm<A> norm{static_cast<A>(eps), true};
    dev.rows(rows, d,
             GeluPaperNormRow<T, A>{d, ptr<T>(x), drop, ptr<T>(weight), ptr<T>(bias), norm,
                                    ptr<T>(y), ptr<A>(stats)});
    return 0;
  });
  return {y, stats};
}

// Gradients of x, weight and bias from grad_y and what the forward read and saved.
template <class Dev>
std::tuple<Tensor, Tensor, Tensor> gelu_paper_norm_backward(Tensor grad_y, Tensor x,
                                                            Tensor weight, Tensor stats,
                                                            std::optional<Tensor> dropout_seed,
                                                            double dropout, double eps) {
  Dev::check_dtype(x.scalar_type());
  const int64_t d = check_gelu_paper_norm(x, weight, weight);
  const int64_t rows = x.numel() / d;
  check_tensor(stats, "stats", {rows, kNormStats}, acc_type(x.scalar_type()), x,
               "gelu_paper_norm_backward");
  STD_TORCH_CHECK(grad_y.numel() == x.numel() && grad_y.scalar_type() == x.scalar_type(),
                  "gelu_paper_norm_backward: grad_y must match x");
  x = torch::stable::contiguous(x);
  grad_y = torch::stable::contiguous(grad_y);
  weight = torch::stable::contiguous(weight);
  Tensor grad_x = torch::stable::empty_like(x);
  if (rows == 0) {
    Tensor zeros = torch::stable::new_zeros(weight, {d});
    return {grad_x, zeros, torch::stable::new_zeros(weight, {d})};
  }
  Dev dev(x);
  Tensor sums = Dev::dispatch(x.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const Dropout<A> drop = check_dropout<A>(dropout_seed, dropout, x, "gelu_paper_norm");
    const Norm<A> norm{static_cast<A>(eps), true};
    const GeluPaperNormGradRow<T, A> row{d, ptr<T>(grad_y), ptr<T>(x), drop, ptr<T>(weight),
                                        ptr<A>(stats), norm, ptr<T>(grad_x)};
    return epilogue_grads<A>(dev, x, rows, d, row);  // (3 * D + 2,): weight, bias, unused
  });
  // copies: the two gradients must not alias the table or each other
  const auto slice = [&](int64_t start) {
    return torch::stable::to(torch::stable::narrow(sums, 0, start, d), x.scalar_type(),
                             std::nullopt, std::nullopt, std::nullopt, false, true);
  };
  return {grad_x, slice(0), slice(d)};
}

}  // namespace convrec
