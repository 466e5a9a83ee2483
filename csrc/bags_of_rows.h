// The backward of the bags_of_rows op (convrec/ops/bags_of_rows.py, whose forward is ATen's
// embedding_bag): bag r sums the table rows picked[offsets[r] .. offsets[r + 1]), so the table's
// gradient adds grad[r] into each of those rows. CPU only. ATen's embedding_bag backward sorts
// every bag entry by table row first; the few hundred attribute rows of the faithful item
// encoder fit in cache, so this one adds each entry's gradient row into a block's partial
// table, the blocks summed in a fixed order (deterministic whatever the thread count).
#pragma once

#include <algorithm>
#include <vector>

#include "downscale_driver.h"

namespace convrec {

// Bags per partial table of the backward: fixed, so the sums do not depend on the threads.
constexpr int64_t kBagsPerBlock = 8192;

// Block k of the backward: for its bags r in order, grad[r] added to the partial table's row
// of every entry of r.
template <typename T, typename A>
struct BagGradBlock {
  int64_t bags, table_rows, d;
  const int64_t* offsets;
  const int64_t* picked;
  const T* grad;
  A* partials;  // (blocks, table_rows, D), zeroed

  CONVREC_HD void operator()(int64_t k) const {
    A* part = partials + k * table_rows * d;
    const int64_t end = std::min(bags, (k + 1) * kBagsPerBlock);
    for (int64_t r = k * kBagsPerBlock; r < end; ++r) {
      const T* g = grad + r * d;
      for (int64_t e = offsets[r]; e < offsets[r + 1]; ++e) {
        A* dst = part + picked[e] * d;
        CONVREC_SIMD
        for (int64_t c = 0; c < d; ++c) dst[c] += static_cast<A>(g[c]);
      }
    }
  }
};

// offsets (R + 1,) int64 from 0, nondecreasing; picked (offsets[R],) int64 in [0, table_rows):
// checked on the host (a CPU op), one clear error each.
inline void check_bags(const Tensor& offsets, const Tensor& picked, int64_t table_rows,
                       const Tensor& ref, const char* op) {
  STD_TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
                  ": offsets must be a 1-D tensor of R + 1 bag starts, got ", shape_str(offsets));
  check_tensor(offsets, "offsets", {offsets.size(0)}, ScalarType::Long, ref, op);
  const int64_t* off = ptr<int64_t>(offsets);
  const int64_t bags = offsets.size(0) - 1;
  STD_TORCH_CHECK(off[0] == 0, op, ": offsets must start at 0, got ", off[0]);
  for (int64_t r = 0; r < bags; ++r)
    STD_TORCH_CHECK(off[r + 1] >= off[r], op, ": offsets must not decrease, but offsets[", r + 1,
                    "] = ", off[r + 1], " < offsets[", r, "] = ", off[r]);
  check_table_rows(picked, "picked", off[bags], table_rows, ref, op);
}

// The table's gradient (table_rows, D) from the bags' (R, D).
template <class Dev>
Tensor bags_of_rows_backward(Tensor grad, Tensor offsets, Tensor picked, int64_t table_rows) {
  Dev::check_dtype(grad.scalar_type());
  STD_TORCH_CHECK(grad.dim() == 2, "bags_of_rows_backward: grad must be (R, D), got ",
                  shape_str(grad));
  STD_TORCH_CHECK(table_rows >= 0, "bags_of_rows_backward: table_rows must be >= 0");
  grad = torch::stable::contiguous(grad);
  offsets = torch::stable::contiguous(offsets);
  picked = torch::stable::contiguous(picked);
  check_bags(offsets, picked, table_rows, grad, "bags_of_rows_backward");
  const int64_t bags = offsets.size(0) - 1, d = grad.size(1);
  STD_TORCH_CHECK(grad.size(0) == bags, "bags_of_rows_backward: grad has ", grad.size(0),
                  " rows for ", bags, " bags");
  const ScalarType acc = acc_type(grad.scalar_type());
  const int64_t blocks = std::max<int64_t>(1, (bags + kBagsPerBlock - 1) / kBagsPerBlock);
  Tensor partials = torch::stable::new_zeros(grad, {blocks, table_rows, d}, acc);
  if (bags > 0 && d > 0 && table_rows > 0) {
    Dev dev(grad);
    Dev::dispatch(grad.scalar_type(), [&](auto t, auto a) {
      using T = decltype(t);
      using A = decltype(a);
      const BagGradBlock<T, A> block{bags, table_rows, d, ptr<int64_t>(offsets),
                                     ptr<int64_t>(picked), ptr<T>(grad), ptr<A>(partials)};
      dev.columns(blocks, block, 1);  // one task per block: a block is thousands of bags
      return 0;
    });
  }
  const std::vector<int64_t> block_dim{0};
  const Tensor sum =
      torch::stable::sum(partials, torch::headeronly::IntHeaderOnlyArrayRef(block_dim));
  return torch::stable::to(sum, grad.scalar_type());
}

}  // namespace convrec
