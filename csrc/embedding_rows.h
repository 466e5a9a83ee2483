// The backward of the embedding_rows op (convrec/ops/embedding_rows.py, whose forward is ATen's
// embedding): the table's gradient is zero except at the picked rows, each the sum of its
// entries' gradient rows (none at padding_idx). CPU only. ATen's embedding backward fills the
// table's (rows, D) gradient with vector stores, which read every cache line before writing
// it; at 200k items x 64 that fill is most of the faithful step's item-table cost. Here each
// chunk of the table is zeroed by memset (glibc writes whole lines without reading them) and
// then receives the entries that fall in it, in entry order: deterministic whatever the
// thread count.
#pragma once

#include <algorithm>
#include <cstring>

#include "downscale_driver.h"

namespace convrec {

// Table chunks of the backward, one task each; every chunk scans the entries once.
constexpr int64_t kEmbeddingRowChunks = 8;

template <typename T>
struct EmbeddingRowsChunk {
  int64_t entries, table_rows, chunk_rows, d, padding_idx;
  const int64_t* ids;
  const T* grad;
  T* out;

  void operator()(int64_t k) const {
    const int64_t begin = k * chunk_rows, end = std::min(table_rows, begin + chunk_rows);
    if (begin >= end) return;
    std::memset(out + begin * d, 0, static_cast<size_t>((end - begin) * d) * sizeof(T));
    for (int64_t e = 0; e < entries; ++e) {
      const int64_t row = ids[e];
      if (row < begin || row >= end || row == padding_idx) continue;
      T* dst = out + row * d;
      const T* g = grad + e * d;
      CONVREC_SIMD
      for (int64_t c = 0; c < d; ++c) dst[c] += g[c];
    }
  }
};

// The table's gradient (table_rows, D) from the gradient (R, D) of the rows ids (R,) picked;
// padding_idx < 0: no padding row. ids are checked on the host (a CPU op), one clear error.
template <class Dev>
Tensor embedding_rows_backward(Tensor grad, Tensor ids, int64_t table_rows, int64_t padding_idx) {
  Dev::check_dtype(grad.scalar_type());
  STD_TORCH_CHECK(grad.dim() == 2, "embedding_rows_backward: grad must be (R, D), got ",
                  shape_str(grad));
  STD_TORCH_CHECK(table_rows >= 0, "embedding_rows_backward: table_rows must be >= 0");
  grad = torch::stable::contiguous(grad);
  ids = torch::stable::contiguous(ids);
  const int64_t entries = grad.size(0), d = grad.size(1);
  check_table_rows(ids, "ids", entries, table_rows, grad, "embedding_rows_backward");
  Tensor out = torch::stable::new_empty(grad, {table_rows, d});
  if (table_rows > 0 && d > 0) {
    Dev dev(grad);
    Dev::dispatch(grad.scalar_type(), [&](auto t, auto) {
      using T = decltype(t);
      const int64_t chunk_rows = (table_rows + kEmbeddingRowChunks - 1) / kEmbeddingRowChunks;
      const EmbeddingRowsChunk<T> chunk{entries,        table_rows,   chunk_rows, d, padding_idx,
                                        ptr<int64_t>(ids), ptr<T>(grad), ptr<T>(out)};
      dev.columns(kEmbeddingRowChunks, chunk, 1);
      return 0;
    });
  }
  return out;
}

}  // namespace convrec
