// The level loop of the stream_downscale op (the anchored stack, every position in one pass),
// written once for both devices like downscale_driver.h, whose folding, epilogues and gradient
// unfolding it shares. Input: left-aligned histories x (B, L, D) (position 0 = each user's
// first event); output: (B, L, D), slot t the user vector after event t. Slots past a
// history's end hold values that no earlier slot depends on (every step is causal), so the op
// needs no lengths and the caller drops them.
//
// A level: pack its input by window offset (SlotPackRow), one batched GEMM with the folded
// weight of each offset, StreamWindowRow (closed elements' terms and pools), EpilogueRow. The
// backward runs the same steps in reverse; the gradient of the folded weight is one more
// batched GEMM, unfolded into the packed gradient as in downscale. newest_last (see
// stream_downscale.h) replaces the packing by GEMMs of the open terms of every position with
// the last offset's weight and, per offset, of the final versions of the places read there
// (ClosedLayout); it saves the level input in the packed input's place.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include "downscale_driver.h"
#include "stream_downscale.h"

namespace convrec {

using StreamForwardOut = std::tuple<Tensor, std::vector<Tensor>>;
using StreamBackwardOut = std::tuple<Tensor, Tensor>;  // grad x, grad of the packed parameters

// Entries the forward saves per level, in this order.
constexpr int kStreamSavedPerLevel = 5;
enum StreamSavedSlot {
  kStreamPacked = 0,
  kStreamPre,
  kStreamPooled,
  kStreamResPooled,
  kStreamStats
};

// Validated sizes of a call: the downscale Geometry the folding reads (kernel = stride) and
// each level's anchored geometry.
struct StreamGeometry {
  Geometry g;
  std::vector<StreamLevel> levels;
  int64_t span = 1;  // positions per window of the last level
};

inline StreamGeometry check_stream_geometry(int64_t batch, int64_t length, int64_t d,
                                            const std::vector<int64_t>& strides) {
  STD_TORCH_CHECK(batch >= 1 && length >= 1 && d >= 1,
                  "stream_downscale: x must be a non-empty (B, L, D) tensor, got (", batch, ", ",
                  length, ", ", d, ")");
  STD_TORCH_CHECK(!strides.empty(), "stream_downscale: the extension needs at least one level");
  StreamGeometry s;
  s.g = Geometry{batch, length, d, {}};
  for (size_t l = 0; l < strides.size(); ++l) {
    const int64_t k = strides[l];
    STD_TORCH_CHECK(k >= 1, "stream_downscale: level ", l, " needs stride >= 1, got ", k);
    s.g.levels.push_back(Level{length, length, k, k, 0});  // only the kernel is read (folding)
    const int64_t blocks = (length + s.span * k - 1) / (s.span * k);
    s.levels.push_back(StreamLevel{batch, length, s.span, k, blocks});
    s.span *= k;
  }
  return s;
}

// newest_last: the (D, D) folded weight of offset o of a level.
inline Tensor offset_weight(const Tensor& weight, int64_t stride, int64_t d, int64_t o) {
  return torch::stable::select(torch::stable::view(weight, {stride, d, d}), 0, o);
}

// Rows [first, first + count) of a 2-D tensor (a view).
inline Tensor row_block(Tensor t, int64_t first, int64_t count) {
  return torch::stable::narrow(t, 0, first, count);
}

// newest_last: the final versions of a level's elements by place (ClosedLayout).
template <typename T, typename A, class Dev>
Tensor stream_finals(Dev& dev, const StreamLevel& lv, int64_t d, const Tensor& input) {
  const int64_t rows = lv.stride * ClosedLayout{lv}.per_place();
  Tensor finals = torch::stable::new_empty(input, {rows, d});
  dev.rows(rows, d, StreamFinalsRow<T, A>{lv, d, ptr<T>(input), ptr<T>(finals)});
  return finals;
}

template <typename T, typename A, class Dev>
StreamForwardOut stream_forward_levels(Dev& dev, const StreamGeometry& sg, const Tensor& x,
                                       const Params& p, bool mask_aware, const Dropout<A>& drop,
                                       const Norm<A>& norm, bool newest_last) {
  const int64_t m = static_cast<int64_t>(sg.levels.size()), d = sg.g.d, batch = sg.g.batch;
  const int64_t length = sg.g.length, rows = batch * length;
  const ScalarType acc = acc_type(x.scalar_type());
  const T* w = ptr<T>(p.packed);
  std::vector<Tensor> saved;
  Tensor input = x, residual;  // level 0: x is its own long residual
  for (int64_t l = 0; l < m; ++l) {
    const StreamLevel& lv = sg.levels[l];
    Tensor packed, terms, closed;  // newest_last: packed is the input, saved for the backward
    if (newest_last) {
      packed = l == 0 ? torch::stable::clone(input) : input;  // an output must not alias x
      const int64_t k = lv.stride;
      const Tensor open_weight = offset_weight(p.weight[l], k, d, k - 1);
      terms = torch::stable::matmul(view2d(input, rows, d), open_weight);
      const ClosedLayout at{lv};
      closed = torch::stable::new_empty(x, {at.rows(), d});
      if (k > 1) {
        const Tensor finals = stream_finals<T, A>(dev, lv, d, input);
        for (int64_t o = 0; o < k - 1; ++o) {  // places 0 .. o at offset o
          const int64_t count = (o + 1) * at.per_place();
          mm_out(row_block(closed, at.offset_base(o), count), row_block(finals, 0, count),
                 offset_weight(p.weight[l], k, d, o));
        }
      }
    } else {
      packed = torch::stable::new_empty(x, {lv.stride, lv.packed_rows(), d});
      dev.rows(lv.stride * lv.packed_rows(), d,
               SlotPackRow<T, A>{lv, d, ptr<T>(input), ptr<T>(packed)});
      terms = torch::stable::matmul(packed, torch::stable::view(p.weight[l], {lv.stride, d, d}));
    }
    Tensor pre = torch::stable::new_empty(x, {rows, d});
    Tensor pooled = torch::stable::new_empty(x, {batch, length, d});
    const bool shared_pools = l == 0;  // x pooled twice: one tensor holds both
    Tensor res_pooled = shared_pools ? pooled : torch::stable::new_empty(x, {batch, length, d});
    Tensor stats = torch::stable::new_empty(x, {rows, kStats}, acc);
    dev.rows(rows, d,
             StreamWindowRow<T, A>{lv, d, mask_aware, ptr<T>(terms), newest_last,
                                   newest_last ? ptr<T>(closed) : nullptr, ptr<T>(input),
                                   shared_pools ? nullptr : ptr<T>(residual), ptr<T>(pre),
                                   ptr<T>(pooled), ptr<T>(res_pooled), ptr<A>(stats)});
    Tensor out = torch::stable::new_empty(x, {batch, length, d});
    Dropout<A> level_drop = drop;
    level_drop.level = l;
    const LevelLayout& at = p.at[l];
    dev.rows(rows, d,
             EpilogueRow<T, A>{length, d, ptr<T>(pre), ptr<T>(p.bias) + l * d, level_drop,
                               ptr<T>(pooled), ptr<T>(res_pooled), w + at.alpha, w + at.beta,
                               w + at.norm_w, w + at.norm_b, norm, nullptr, ptr<A>(stats),
                               nullptr, Level{}, ptr<T>(out)});
    const Tensor saved_res = shared_pools ? torch::stable::new_empty(x, {0}) : res_pooled;
    saved.insert(saved.end(), {packed, pre, pooled, saved_res, stats});
    input = out;
    residual = res_pooled;
  }
  const int64_t windows = (length + sg.span - 1) / sg.span;
  Tensor closed_sums = torch::stable::new_empty(x, {batch, windows, d}, acc_type(x.scalar_type()));
  A* sums = ptr<A>(closed_sums);
  dev.rows(batch, d, StreamClosedSumsRow<T, A>{length, sg.span, windows, d, ptr<T>(input), sums});
  Tensor user = torch::stable::new_empty(x, {batch, length, d});
  dev.rows(rows, d,
           StreamUserRow<T, A>{length, sg.span, windows, d, ptr<T>(input), sums, ptr<T>(user)});
  return {user, saved};
}

template <typename T, typename A, class Dev>
StreamBackwardOut stream_backward_levels(Dev& dev, const StreamGeometry& sg, const Tensor& grad,
                                         const Params& p, const Dropout<A>& drop,
                                         const Norm<A>& norm, const std::vector<Tensor>& saved,
                                         bool newest_last) {
  const int64_t m = static_cast<int64_t>(sg.levels.size()), d = sg.g.d, batch = sg.g.batch;
  const int64_t length = sg.g.length, rows = batch * length;
  const Tensor& ref = p.packed;
  const ScalarType acc = acc_type(ref.scalar_type());
  const T* w = ptr<T>(p.packed);
  Tensor grad_params = torch::stable::new_empty(ref, {ref.size(0)});
  Tensor direct = torch::stable::new_empty(ref, {batch, length, d});
  const int64_t windows = (length + sg.span - 1) / sg.span;
  Tensor window_grads = torch::stable::new_empty(ref, {batch, windows, d}, acc);
  A* later = ptr<A>(window_grads);
  dev.rows(batch * windows, d,
           StreamUserWindowSumsRow<T, A>{length, sg.span, windows, d, ptr<T>(grad), later});
  dev.rows(batch, d, StreamLaterWindowsRow<A>{windows, d, later});
  dev.rows(rows, d,
           StreamUserGradRow<T, A>{length, sg.span, windows, d, ptr<T>(grad), later,
                                   ptr<T>(direct)});
  StreamGrads<T, A> after{sg.levels[m - 1], ptr<T>(direct), nullptr, nullptr};
  Tensor after_terms, after_res, after_finals;  // keep level l + 1's gradients alive
  for (int64_t l = m - 1; l >= 0; --l) {
    const StreamLevel& lv = sg.levels[l];
    const Tensor* s = &saved[kStreamSavedPerLevel * l];
    const Tensor& res_pooled =
        s[kStreamResPooled].numel() == 0 ? s[kStreamPooled] : s[kStreamResPooled];
    Tensor grad_pre = torch::stable::new_empty(ref, {rows, d});
    Tensor grad_pooled = torch::stable::new_empty(ref, {rows, d});
    Tensor grad_res_pooled = torch::stable::new_empty(ref, {rows, d});
    Dropout<A> level_drop = drop;
    level_drop.level = l;
    const LevelLayout& at = p.at[l];
    EpilogueGradRow<T, A, StreamGrads<T, A>> epilogue{length,
                                                      d,
                                                      ptr<T>(s[kStreamPre]),
                                                      level_drop,
                                                      ptr<T>(s[kStreamPooled]),
                                                      ptr<T>(res_pooled),
                                                      w + at.alpha,
                                                      w + at.beta,
                                                      w + at.norm_w,
                                                      ptr<A>(s[kStreamStats]),
                                                      norm,
                                                      nullptr,
                                                      false,
                                                      nullptr,
                                                      nullptr,
                                                      after,
                                                      nullptr,
                                                      ptr<T>(grad_pre),
                                                      ptr<T>(grad_pooled),
                                                      ptr<T>(grad_res_pooled)};
    const Tensor sums = epilogue_grads<A>(dev, ref, rows, d, epilogue);
    Tensor element_sums = torch::stable::new_empty(ref, {batch * lv.elements(), 3, d}, acc);
    dev.rows(batch * lv.elements(), d,
             StreamElementSumRow<T, A>{lv, d, ptr<T>(grad_pre), ptr<T>(grad_pooled),
                                       ptr<T>(grad_res_pooled), ptr<A>(s[kStreamStats]),
                                       ptr<A>(element_sums)});
    Tensor grad_terms = newest_last
                            ? torch::stable::new_empty(ref, {0})
                            : torch::stable::new_zeros(ref, {lv.stride, lv.packed_rows(), d});
    Tensor grad_input = torch::stable::new_empty(ref, {batch, length, d});
    Tensor grad_res = torch::stable::new_empty(ref, {batch, length, d});
    dev.rows(rows, d,
             StreamWindowGradRow<T, A>{lv, d, ptr<T>(grad_pre), ptr<T>(grad_pooled),
                                       ptr<T>(grad_res_pooled), ptr<A>(s[kStreamStats]),
                                       ptr<A>(element_sums),
                                       newest_last ? nullptr : ptr<T>(grad_terms),
                                       ptr<T>(grad_input), ptr<T>(grad_res)});
    Tensor grad_w;  // (stride, D, D): the gradient of each offset's folded weight
    if (newest_last) {
      const Tensor& input = s[kStreamPacked];
      const int64_t k = lv.stride;
      const ClosedLayout at{lv};
      grad_w = torch::stable::new_empty(ref, {k, d, d});
      after_finals = torch::stable::new_empty(ref, {at.rows(), d});
      if (k > 1) {
        const Tensor finals = stream_finals<T, A>(dev, lv, d, input);
        Tensor grad_closed = torch::stable::new_empty(ref, {at.rows(), d});
        dev.rows(at.rows(), d,
                 StreamClosedGradRow<T, A>{lv, d, ptr<A>(element_sums), ptr<T>(grad_closed)});
        for (int64_t o = 0; o < k - 1; ++o) {
          const int64_t first = at.offset_base(o), count = (o + 1) * at.per_place();
          const Tensor g = row_block(grad_closed, first, count);
          const Tensor weight = offset_weight(p.weight[l], k, d, o);
          mm_out(row_block(after_finals, first, count), g, torch::stable::transpose(weight, 0, 1));
          mm_out(torch::stable::select(grad_w, 0, o),
                 torch::stable::transpose(row_block(finals, 0, count), 0, 1), g);
        }
      }
      const Tensor open_weight = offset_weight(p.weight[l], k, d, k - 1);
      after_terms = torch::stable::matmul(grad_pre, torch::stable::transpose(open_weight, 0, 1));
      mm_out(torch::stable::select(grad_w, 0, k - 1),
             torch::stable::transpose(view2d(input, rows, d), 0, 1), grad_pre);
    } else {
      const Tensor weight = torch::stable::view(p.weight[l], {lv.stride, d, d});
      after_terms = torch::stable::matmul(grad_terms, torch::stable::transpose(weight, 1, 2));
      grad_w = torch::stable::matmul(torch::stable::transpose(s[kStreamPacked], 1, 2), grad_terms);
    }
    unfold_level_grads<T, A>(dev, p, l, lv.stride,
                             view2d(torch::stable::to(grad_w, acc), lv.stride * d, d), sums,
                             grad_params);
    direct = grad_input;
    after_res = grad_res;
    after = StreamGrads<T, A>{lv, ptr<T>(direct), ptr<T>(after_terms), ptr<T>(after_res),
                              newest_last, newest_last ? ptr<T>(after_finals) : nullptr};
  }
  Tensor grad_x = torch::stable::new_empty(ref, {batch, length, d});
  dev.rows(rows, d, StreamInputGradRow<T, A>{length, d, after, ptr<T>(grad_x)});
  return {grad_x, grad_params};
}

// ------------------------------------------------------------------------ op entries ----

inline StreamGeometry check_stream_call(const Tensor& ref, int64_t batch, int64_t length,
                                        int64_t d, const Tensor& params,
                                        const std::vector<int64_t>& strides, int64_t heads) {
  const StreamGeometry sg = check_stream_geometry(batch, length, d, strides);
  check_packed(params, heads, sg.g, ref, "stream_downscale");
  return sg;
}

template <class Dev>
StreamForwardOut stream_downscale_forward(Tensor x, Tensor params, std::vector<int64_t> strides,
                                          int64_t heads, bool mask_aware,
                                          std::optional<Tensor> dropout_seed, double dropout,
                                          double eps, bool newest_last) {
  STD_TORCH_CHECK(x.dim() == 3, "stream_downscale: x must have shape (B, L, D), got ",
                  shape_str(x));
  Dev::check_dtype(x.scalar_type());
  x = torch::stable::contiguous(x);
  const StreamGeometry sg =
      check_stream_call(x, x.size(0), x.size(1), x.size(2), params, strides, heads);
  params = torch::stable::contiguous(params);
  Dev dev(x);
  return Dev::dispatch(x.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const Dropout<A> drop = check_dropout<A>(dropout_seed, dropout, x, "stream_downscale");
    const Params p = fold_levels<T, A>(dev, sg.g, params, heads);
    const Norm<A> norm{static_cast<A>(eps), false};
    return stream_forward_levels<T, A>(dev, sg, x, p, mask_aware, drop, norm, newest_last);
  });
}

template <class Dev>
StreamBackwardOut stream_downscale_backward(Tensor grad, Tensor params,
                                            std::vector<int64_t> strides, int64_t heads,
                                            std::optional<Tensor> dropout_seed,
                                            double dropout, double eps, bool newest_last,
                                            std::vector<Tensor> saved) {
  STD_TORCH_CHECK(grad.dim() == 3,
                  "stream_downscale_backward: grad must have shape (B, L, D), got ",
                  shape_str(grad));
  Dev::check_dtype(grad.scalar_type());
  grad = torch::stable::contiguous(grad);
  const StreamGeometry sg =
      check_stream_call(grad, grad.size(0), grad.size(1), grad.size(2), params, strides, heads);
  params = torch::stable::contiguous(params);
  const int64_t m = static_cast<int64_t>(strides.size());
  STD_TORCH_CHECK(static_cast<int64_t>(saved.size()) == kStreamSavedPerLevel * m,
                  "stream_downscale_backward: saved holds ", saved.size(), " tensors, expected ",
                  kStreamSavedPerLevel * m, " (the forward's second output)");
  for (const auto& t : saved)
    STD_TORCH_CHECK(t.is_contiguous() && same_device(t, grad),
                    "stream_downscale_backward: saved tensors must be the forward's own outputs");
  Dev dev(grad);
  return Dev::dispatch(grad.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const Dropout<A> drop = check_dropout<A>(dropout_seed, dropout, grad, "stream_downscale");
    const Params p = fold_levels<T, A>(dev, sg.g, params, heads);
    const Norm<A> norm{static_cast<A>(eps), false};
    return stream_backward_levels<T, A>(dev, sg, grad, p, drop, norm, saved, newest_last);
  });
}

}  // namespace convrec
