// The forward of the rows_with_context op (convrec/ops/rows_with_context.py): position n of
// the faithful item encoder's dropped fused vectors, y[n] = drop_n(table[where[n]] + weight @
// context[n]), a per-id row plus the position's date-context product, with StackDropout's
// level-0 mask over the (N, W) output, in one pass (composed of ATen ops: a gather, addmm's copy
// and K = 6 product, and a dropout pass over the (N, W) tensor). CPU only; the backward is
// composed in Python of the stack_dropout and embedding_rows_backward ops and one GEMM.
#pragma once

#include "embedding_rows.h"

namespace convrec {

// Forward row n: W values from the table row, the context product and the dropout factor.
template <typename T, typename A>
struct RowWithContextRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 1;  // the row's W sums
  int64_t w, k;
  Dropout<A> drop;
  const T* table;
  const int64_t* where;
  const T* context;  // (N, K) or nullptr
  const T* weight_t;  // (K, W)
  T* out;

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* v) const {
    const T* row = table + where[n] * w;
    T* o = out + n * w;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < w; c += Team::size) v[c] = static_cast<A>(row[c]);
    for (int64_t j = 0; context != nullptr && j < k; ++j) {
      const A cj = static_cast<A>(context[n * k + j]);
      const T* wj = weight_t + j * w;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < w; c += Team::size) v[c] += cj * static_cast<A>(wj[c]);
    }
    if (!drop.on()) {
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < w; c += Team::size) o[c] = static_cast<T>(v[c]);
      return;
    }
    const uint32_t key = drop.row_key(n);
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < w; c += Team::size)
      o[c] = static_cast<T>(v[c] * drop.factor(key, c));
  }
};

inline void check_rows_with_context(const Tensor& where, int64_t positions, int64_t table_rows,
                                    const std::optional<Tensor>& context, int64_t k,
                                    const Tensor& ref, const char* op) {
  check_table_rows(where, "where", positions, table_rows, ref, op);
  if (context.has_value()) check_tensor(*context, "context", {positions, k}, ref.scalar_type(), ref, op);
}

// (N, W) from table (R, W), where (N,), context (N, K) or none, weight (W, K).
template <class Dev>
Tensor rows_with_context(Tensor table, Tensor where, std::optional<Tensor> context,
                         Tensor weight, std::optional<Tensor> dropout_seed, double dropout) {
  const char* op = "rows_with_context";
  Dev::check_dtype(table.scalar_type());
  STD_TORCH_CHECK(table.dim() == 2, op, ": table must be (R, W), got ", shape_str(table));
  STD_TORCH_CHECK(weight.dim() == 2 && weight.size(0) == table.size(1), op,
                  ": weight must be (W, K) with W = ", table.size(1), ", got ", shape_str(weight));
  table = torch::stable::contiguous(table);
  where = torch::stable::contiguous(where);
  const int64_t w = table.size(1), k = weight.size(1);
  const int64_t positions = where.dim() == 1 ? where.size(0) : -1;
  STD_TORCH_CHECK(positions >= 0, op, ": where must be 1-D, got ", shape_str(where));
  if (context.has_value()) context = torch::stable::contiguous(*context);
  check_rows_with_context(where, positions, table.size(0), context, k, table, op);
  check_tensor(weight, "weight", {w, k}, table.scalar_type(), table, op);
  const Tensor weight_t = torch::stable::contiguous(torch::stable::transpose(weight, 0, 1));
  Tensor out = torch::stable::new_empty(table, {positions, w});
  if (positions == 0 || w == 0) return out;
  Dev dev(table);
  Dev::dispatch(table.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const Dropout<A> drop = check_dropout<A>(dropout_seed, dropout, table, op);
    const T* ctx = context.has_value() ? ptr<T>(*context) : nullptr;
    dev.rows(positions, w,
             RowWithContextRow<T, A>{w, k, drop, ptr<T>(table), ptr<int64_t>(where), ctx,
                                     ptr<T>(weight_t), ptr<T>(out)});
    return 0;
  });
  return out;
}

}  // namespace convrec
