// The level loop of the downscale op, written once for both devices. `Dev` runs the row passes
// of downscale.h (CpuDevice in downscale_cpu.cpp, CudaDevice in downscale_cuda.cu); the GEMMs go
// through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA, on the current stream) via the stable ABI.
//
// The parameters of every level arrive packed in one vector (LevelLayout in downscale.h). Each
// level's grouped conv and Linear are folded here into one (kernel * D, D) matrix W and one bias
// (fold_levels), so a level is: window pass, one GEMM, one epilogue; the backward unfolds W's
// gradient into the packed gradient (one tensor for the whole stack).
// The window matrix of a level input is (B, windows, kernel, D): for kernel == stride it is the
// zero-padded sequence itself; overlapping windows hold a position once per window.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <array>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "downscale.h"
#include "torch_compat.h"

namespace convrec {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

using ForwardOut = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>;
// grad x, grad residual, grad of the packed parameters
using BackwardOut = std::tuple<Tensor, Tensor, Tensor>;

// Entries the forward saves per level, in this order, then the position-mean divisors.
constexpr int kSavedPerLevel = 6;
enum SavedSlot { kWin = 0, kPre, kPooled, kResPooled, kRowStats, kRowMask };

// ------------------------------------------------------------------------- validation ----

inline std::string shape_str(const Tensor& t) {
  std::ostringstream out;
  out << "(";
  for (int64_t i = 0; i < t.dim(); ++i) out << (i ? ", " : "") << t.size(i);
  out << (t.dim() == 1 ? ",)" : ")");
  return out.str();
}

inline std::string shape_str(const std::vector<int64_t>& sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cuda() == b.is_cuda() && a.get_device_index() == b.get_device_index();
}

// `t` has exactly `sizes`, dtype `dtype` and lives on `ref`'s device; `op` names the op.
inline void check_tensor(const Tensor& t, const std::string& name,
                         const std::vector<int64_t>& sizes, ScalarType dtype, const Tensor& ref,
                         const char* op = "downscale") {
  bool same = t.dim() == static_cast<int64_t>(sizes.size());
  for (size_t i = 0; same && i < sizes.size(); ++i) same = t.size(i) == sizes[i];
  STD_TORCH_CHECK(same, op, ": ", name, " must have shape ", shape_str(sizes), ", got ",
                  shape_str(t));
  STD_TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ",
                  torch::headeronly::toString(dtype), ", got ",
                  torch::headeronly::toString(t.scalar_type()));
  STD_TORCH_CHECK(same_device(t, ref), op, ": ", name, " is on another device than x");
}

// Validated sizes of one call: batch, length, width and each level's geometry.
struct Geometry {
  int64_t batch = 0, length = 0, d = 0;
  std::vector<Level> levels;
};

inline Geometry check_geometry(int64_t batch, int64_t length, int64_t d,
                               const std::vector<int64_t>& kernels,
                               const std::vector<int64_t>& strides) {
  STD_TORCH_CHECK(batch >= 1 && length >= 1 && d >= 1,
                  "downscale: x must be a non-empty (B, L, D) tensor, got (", batch, ", ", length,
                  ", ", d, ")");
  STD_TORCH_CHECK(!kernels.empty(), "downscale: the extension needs at least one level");
  STD_TORCH_CHECK(kernels.size() == strides.size(), "downscale: ", kernels.size(),
                  " kernels but ", strides.size(), " strides");
  Geometry g{batch, length, d, {}};
  int64_t n = length;
  for (size_t l = 0; l < kernels.size(); ++l) {
    const int64_t k = kernels[l], s = strides[l];
    STD_TORCH_CHECK(k >= 1 && s >= 1 && s <= k, "downscale: level ", l,
                    " needs 1 <= stride <= kernel, got kernel ", k, ", stride ", s);
    const Level lv{n, out_length(n, k, s), k, s, left_pad(n, k, s)};
    g.levels.push_back(lv);
    n = lv.windows;
  }
  return g;
}

inline ScalarType acc_type(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// The packed parameters of a call and, per level, its offsets and folded GEMM operands: the
// conv weight as H group matrices (D/H, D/H * kernel) (row c_out, column c * kernel + j; a view
// of the packed tensor in the accumulation dtype), W = C @ Linear^T in the input dtype, with C
// the conv as a block-diagonal (kernel * D, D) matrix (window @ C == GroupedConv(window)), and
// the folded bias (M, D).
struct Params {
  Tensor packed;
  int64_t heads = 1;
  std::vector<LevelLayout> at;
  std::vector<Tensor> conv, weight;
  Tensor bias;
};

inline void check_packed(const Tensor& packed, int64_t heads, const Geometry& g, const Tensor& x,
                         const char* op = "downscale") {
  STD_TORCH_CHECK(heads >= 1 && g.d % heads == 0, op, ": D=", g.d,
                  " is not divisible by heads=", heads);
  int64_t size = 0;
  for (const Level& v : g.levels) size = LevelLayout::at(size, g.d, heads, v.kernel).end;
  check_tensor(packed, "params", {size}, x.scalar_type(), x, op);
}

inline void check_mask(const std::optional<Tensor>& mask, bool mask_aware, const Geometry& g,
                       const Tensor& x) {
  STD_TORCH_CHECK(!mask_aware || mask.has_value(), "downscale: mask_aware needs a mask");
  if (mask.has_value()) check_tensor(*mask, "mask", {g.batch, g.length}, ScalarType::Bool, x);
}

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

template <typename T>
T* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? ptr<T>(*t) : nullptr;
}

// A host-side (CPU op) check of `entries` int64 row indices into a (table_rows, D) table: the
// shape and dtype, then every value, one clear error naming the first row that is not one.
inline void check_table_rows(const Tensor& rows, const char* name, int64_t entries,
                             int64_t table_rows, const Tensor& ref, const char* op) {
  check_tensor(rows, name, {entries}, ScalarType::Long, ref, op);
  const int64_t* r = ptr<int64_t>(rows);
  for (int64_t e = 0; e < entries; ++e)
    STD_TORCH_CHECK(r[e] >= 0 && r[e] < table_rows, op, ": ", name, "[", e, "] = ", r[e],
                    " is not a row of the (", table_rows, ", D) table");
}

// Checks the dropout seed and returns the kernels' view of dropout at level 0.
template <typename A>
Dropout<A> check_dropout(const std::optional<Tensor>& seed, double p, const Tensor& x,
                         const char* op = "downscale") {
  Dropout<A> drop;
  if (!seed.has_value()) return drop;
  check_tensor(*seed, "dropout_seed", {2}, ScalarType::Long, x, op);
  STD_TORCH_CHECK(p > 0.0 && p < 1.0, op, ": dropout must be in (0, 1) with a seed, got ", p);
  drop.seed = ptr<int64_t>(*seed);
  drop.threshold = static_cast<uint32_t>(p * 16777216.0);  // floor(p * 2^24)
  drop.scale = static_cast<A>(1.0 / (1.0 - p));
  return drop;
}

inline Tensor view2d(const Tensor& t, int64_t rows, int64_t cols) {
  return torch::stable::view(t, {rows, cols});
}

// out = a @ b through ATen's mm.out (a GEMM writing straight into a caller's buffer).
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a), torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  CONVREC_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
  torch::stable::detail::to<Tensor>(stack[0]);  // release the returned reference to out
}

// Level l's Linear weight (D, D) [out, in], in the accumulation dtype.
inline Tensor linear_weight(const Tensor& packed, const LevelLayout& at, int64_t d) {
  Tensor flat = packed;  // narrow takes a mutable handle
  return torch::stable::to(
      torch::stable::view(torch::stable::narrow(flat, 0, at.lin_w, d * d), {d, d}),
      acc_type(packed.scalar_type()));
}

// Linear^T (in, out) split by the conv's groups: (H, D/H, D), group h's input channels.
inline Tensor linear_t_by_group(const Tensor& linear, int64_t heads) {
  const int64_t d = linear.size(0);
  return torch::stable::view(torch::stable::transpose(linear, 0, 1), {heads, d / heads, d});
}

// Folds every level's grouped conv and Linear (see Params). Per group h, the conv's group
// matrix transposed times the group's slice of Linear^T gives W's rows of that group ordered
// (c, j), (H, D/H * k, D); reordering the rows to (j, h, c) gives W. One batched GEMM and one
// row copy per level, without C's zero blocks. Recomputed by the backward rather than saved.
template <typename T, typename A, class Dev>
Params fold_levels(const Dev& dev, const Geometry& g, const Tensor& packed, int64_t heads) {
  const int64_t d = g.d, hd = d / heads, m = static_cast<int64_t>(g.levels.size());
  const ScalarType acc = acc_type(packed.scalar_type());
  Params p{packed, heads, {}, {}, {}, torch::stable::new_empty(packed, {m, d})};
  Tensor flat = packed;  // narrow takes a mutable handle
  int64_t base = 0;
  for (int64_t l = 0; l < m; ++l) {
    const int64_t k = g.levels[l].kernel;
    const LevelLayout at = LevelLayout::at(base, d, heads, k);
    base = at.end;
    const T* w = ptr<T>(packed);
    const Tensor conv = torch::stable::to(
        torch::stable::view(torch::stable::narrow(flat, 0, at.conv_w, d * hd * k),
                            {heads, hd, hd * k}),
        acc);
    const Tensor lin_t = linear_t_by_group(linear_weight(packed, at, d), heads);
    Tensor folded = torch::stable::matmul(torch::stable::transpose(conv, 1, 2), lin_t);
    folded = torch::stable::view(folded, {heads, hd, k, d});  // (h, c, j) -> (j, h, c)
    folded = torch::stable::transpose(torch::stable::transpose(folded, 1, 2), 0, 1);
    folded = torch::stable::view(torch::stable::contiguous(folded), {k * d, d});
    dev.columns(d, FoldBiasCol<T, A>{d, w + at.conv_b, w + at.lin_w, w + at.lin_b,
                                     ptr<T>(p.bias) + l * d});
    p.at.push_back(at);
    p.conv.push_back(conv);
    p.weight.push_back(torch::stable::to(folded, packed.scalar_type()));
  }
  return p;
}

// Level 0 may read x in place (no window-matrix copy, x saved instead) when its windows tile x
// exactly: kernel == stride and no padding. With a mask x must also be zero where masked; only
// devices that can check that without a host sync (the CPU) take masked inputs in place.
// convrec/ops/downscale_ext.py mirrors this rule for the shapes of the fake implementation.
template <class Dev>
bool first_level_in_place(const Geometry& g, bool has_mask) {
  const Level& v = g.levels[0];
  return v.kernel == v.stride && v.pad == 0 && (Dev::kChecksMaskOnHost || !has_mask);
}

// x, as the level-0 window matrix, when first_level_in_place holds and x is zero where masked.
template <typename T, class Dev>
bool x_is_window_matrix(const Dev& dev, const Geometry& g, const Tensor& x,
                        const std::optional<Tensor>& mask) {
  return !mask.has_value() ||
         dev.zero_where_masked(ptr<T>(x), ptr<bool>(*mask), g.batch * g.length, g.d);
}

// ---------------------------------------------------------------------------- forward ----

template <typename T, typename A, class Dev>
ForwardOut forward_levels(Dev& dev, const Geometry& g, const Tensor& x,
                          const std::optional<Tensor>& residual,
                          const std::optional<Tensor>& mask, const Params& p, bool mask_aware,
                          const Dropout<A>& drop, const Norm<A>& norm, bool return_levels) {
  const int64_t m = static_cast<int64_t>(g.levels.size()), d = g.d, batch = g.batch;
  const ScalarType acc = acc_type(x.scalar_type());
  std::vector<Tensor> levels, saved;
  const Level& first = g.levels[0];
  const bool in_place = first_level_in_place<Dev>(g, mask.has_value());
  const bool use_x = in_place && x_is_window_matrix<T>(dev, g, x, mask);
  Tensor win;  // the level's window matrix (level 0: unless x serves as one)
  if (!use_x) win = torch::stable::new_empty(x, {batch, first.windows, first.kernel, d});
  Tensor prev_res, prev_mask;
  for (int64_t l = 0; l < m; ++l) {
    const Level& v = g.levels[l];
    const int64_t rows = batch * v.windows;
    Tensor pooled = torch::stable::new_empty(x, {batch, v.windows, d});
    // level 0 without an explicit residual pools x twice: one tensor holds both
    const bool shared_pools = l == 0 && !residual.has_value();
    Tensor res_pooled = shared_pools ? pooled : torch::stable::new_empty(x, {batch, v.windows, d});
    Tensor stats = torch::stable::new_empty(x, {rows, kStats}, acc);
    Tensor row_mask =
        torch::stable::new_empty(x, {mask_aware ? batch : 0, v.windows}, ScalarType::Bool);

    WindowRow<T, A> window{v,
                           d,
                           l == 0 ? ptr<T>(x) : nullptr,
                           l == 0 && use_x ? nullptr : ptr<T>(win),
                           l == 0 ? ptr_or_null<T>(residual) : ptr<T>(prev_res),
                           l == 0 ? ptr_or_null<bool>(mask)
                                  : (mask_aware ? ptr<bool>(prev_mask) : nullptr),
                           l == 0 && mask_aware && residual.has_value(),
                           mask_aware,
                           ptr<T>(pooled),
                           ptr<T>(res_pooled),
                           ptr<A>(stats),
                           mask_aware ? ptr<bool>(row_mask) : nullptr};
    dev.rows(rows, d, window);

    const Tensor& windows = l == 0 && use_x ? x : win;
    const T* w = ptr<T>(p.packed);
    Dropout<A> level_drop = drop;
    level_drop.level = l;
    Tensor pre = torch::stable::matmul(view2d(windows, rows, v.kernel * d), p.weight[l]);
    const bool last = l == m - 1;
    Tensor next_win, plain;
    Level next{};
    if (!last) {
      next = g.levels[l + 1];
      next_win = torch::stable::new_zeros(x, {batch, next.windows, next.kernel, d});
    }
    if (return_levels || last) plain = torch::stable::new_empty(x, {batch, v.windows, d});
    EpilogueRow<T, A> epilogue{v.windows,
                               d,
                               ptr<T>(pre),
                               ptr<T>(p.bias) + l * d,
                               level_drop,
                               ptr<T>(pooled),
                               ptr<T>(res_pooled),
                               w + p.at[l].alpha,
                               w + p.at[l].beta,
                               w + p.at[l].norm_w,
                               w + p.at[l].norm_b,
                               norm,
                               mask_aware ? ptr<bool>(row_mask) : nullptr,
                               ptr<A>(stats),
                               last ? nullptr : ptr<T>(next_win),
                               next,
                               plain.defined() ? ptr<T>(plain) : nullptr};
    dev.rows(rows, d, epilogue);

    // in place, level 0 saves no window matrix: the backward reads x (or rebuilds from it)
    const Tensor saved_win = l == 0 && in_place ? torch::stable::new_empty(x, {0}) : win;
    const Tensor saved_res = shared_pools ? torch::stable::new_empty(x, {0}) : res_pooled;
    saved.insert(saved.end(), {saved_win, pre, pooled, saved_res, stats, row_mask});
    if (plain.defined()) levels.push_back(plain);
    win = next_win;
    prev_res = res_pooled;
    prev_mask = row_mask;
  }
  const Level& end = g.levels[m - 1];
  Tensor user = torch::stable::new_empty(x, {batch, d});
  Tensor denom = torch::stable::new_empty(x, {batch}, acc);
  PositionMeanRow<T, A> position_mean{end.windows, d, ptr<T>(levels.back()),
                                      mask_aware ? ptr<bool>(prev_mask) : nullptr, ptr<T>(user),
                                      ptr<A>(denom)};
  dev.rows(batch, d, position_mean);
  saved.push_back(denom);
  return {user, levels, saved};
}

// --------------------------------------------------------------------------- backward ----

// Runs a level's backward epilogue (an EpilogueGradRow) over `rows` rows and returns its
// parameter sums ((3 * D + 2,): LayerNorm weight and bias, folded bias, alpha, beta). Each team
// adds into its own slot of a table that ATen then sums in a fixed order: deterministic.
template <typename A, class Dev, class Row>
Tensor epilogue_grads(const Dev& dev, const Tensor& ref, int64_t rows, int64_t d,
                      const Row& epilogue) {
  const int64_t slots =
      dev.slots(rows, Row::scratch_rows * d * static_cast<int64_t>(sizeof(A)));
  Tensor table = torch::stable::new_zeros(ref, {slots, 3 * d + 2}, acc_type(ref.scalar_type()));
  dev.grad_rows(rows, d, epilogue, ptr<A>(table), slots);
  const std::vector<int64_t> slot_dim{0};
  return torch::stable::sum(table, torch::headeronly::IntHeaderOnlyArrayRef(slot_dim));
}

// Level l's slice of the packed gradient from the gradient of its folded GEMM weight
// (`grad_w`, (kernel * D, D) in the accumulation dtype) and the row passes' parameter sums
// (`sums`, (3 * D + 2,): LayerNorm weight and bias, folded bias, alpha, beta). With dW's rows
// back in fold_levels' (h, c, j) order, per group Linear^T's slice @ dW^T is the conv weight's
// gradient in its packed layout and the group's conv matrix @ dW the Linear weight's gradient,
// transposed; UnfoldLevelGrads writes them with the bias terms.
template <typename T, typename A, class Dev>
void unfold_level_grads(const Dev& dev, const Params& p, int64_t l, int64_t kernel,
                        const Tensor& grad_w, const Tensor& sums, const Tensor& grad_params) {
  const int64_t d = grad_w.size(1), heads = p.heads, hd = d / heads;
  const LevelLayout& at = p.at[l];
  Tensor by_group = torch::stable::view(grad_w, {kernel, heads, hd, d});  // (j, h, c) -> (h, c, j)
  by_group = torch::stable::transpose(torch::stable::transpose(by_group, 0, 1), 1, 2);
  by_group = torch::stable::view(torch::stable::contiguous(by_group), {heads, hd * kernel, d});
  const Tensor lin_t = linear_t_by_group(linear_weight(p.packed, at, d), heads);
  const Tensor grad_conv = torch::stable::matmul(lin_t, torch::stable::transpose(by_group, 1, 2));
  const Tensor grad_lin_t = torch::stable::matmul(p.conv[l], by_group);
  dev.columns(d, UnfoldLevelGrads<T, A>{d, hd * kernel, at, ptr<A>(sums), ptr<A>(grad_conv),
                                        ptr<A>(grad_lin_t), ptr<T>(p.packed),
                                        ptr<T>(grad_params)});
}

template <typename T, typename A, class Dev>
BackwardOut backward_levels(Dev& dev, const Geometry& g, const std::optional<Tensor>& x,
                            const std::optional<Tensor>& grad_user,
                            const std::vector<Tensor>& grad_levels,
                            const std::optional<Tensor>& mask, const Params& p, bool mask_aware,
                            bool has_residual, const Dropout<A>& drop, const Norm<A>& norm,
                            const std::vector<Tensor>& saved) {
  const int64_t m = static_cast<int64_t>(g.levels.size()), d = g.d, batch = g.batch;
  const Tensor& ref = p.packed;
  const ScalarType acc = acc_type(ref.scalar_type());
  Tensor grad_x = torch::stable::new_empty(ref, {batch, g.length, d});
  Tensor grad_res =
      torch::stable::new_empty(ref, {has_residual ? batch : 0, g.length, d});
  Tensor grad_params = torch::stable::new_empty(p.packed, {p.packed.size(0)});
  const T* w = ptr<T>(p.packed);
  const Tensor& denom = saved[kSavedPerLevel * m];

  WindowGrads<T, A> after{};
  Tensor after_win, after_pooled, after_res;  // keep level l + 1's gradients alive
  for (int64_t l = m - 1; l >= 0; --l) {
    const Level& v = g.levels[l];
    const int64_t rows = batch * v.windows;
    const Tensor* s = &saved[kSavedPerLevel * l];
    Tensor grad_pre = torch::stable::new_empty(ref, {rows, d});
    Tensor grad_pooled = torch::stable::new_empty(ref, {rows, d});
    Tensor grad_res_pooled = torch::stable::new_empty(ref, {rows, d});
    const bool last = l == m - 1;
    const Tensor* grad_plain =
        grad_levels.empty() || grad_levels[l].numel() == 0 ? nullptr : &grad_levels[l];
    Dropout<A> level_drop = drop;
    level_drop.level = l;
    EpilogueGradRow<T, A> epilogue{v.windows,
                                   d,
                                   ptr<T>(s[kPre]),
                                   level_drop,
                                   ptr<T>(s[kPooled]),
                                   ptr<T>(s[s[kResPooled].numel() == 0 ? kPooled : kResPooled]),
                                   w + p.at[l].alpha,
                                   w + p.at[l].beta,
                                   w + p.at[l].norm_w,
                                   ptr<A>(s[kRowStats]),
                                   norm,
                                   mask_aware ? ptr<bool>(s[kRowMask]) : nullptr,
                                   last,
                                   last ? ptr_or_null<T>(grad_user) : nullptr,
                                   ptr<A>(denom),
                                   after,
                                   grad_plain ? ptr<T>(*grad_plain) : nullptr,
                                   ptr<T>(grad_pre),
                                   ptr<T>(grad_pooled),
                                   ptr<T>(grad_res_pooled)};
    const Tensor sums = epilogue_grads<A>(dev, ref, rows, d, epilogue);
    const Tensor weight_t = torch::stable::transpose(p.weight[l], 0, 1);
    Tensor win2d;
    if (l == 0 && s[kWin].numel() == 0) {  // the forward read x in place
      const Tensor& xs = *x;
      if (x_is_window_matrix<T>(dev, g, xs, mask)) {
        win2d = view2d(xs, rows, v.kernel * d);
      } else {
        win2d = torch::stable::new_empty(xs, {rows, v.kernel * d});
        dev.rows(rows, d, WindowMatrixRow<T, A>{v, d, ptr<T>(xs), ptr_or_null<bool>(mask),
                                                ptr<T>(win2d)});
      }
      // windows tile x: the window gradient is grad x itself, finished in place below
      after_win = grad_x;
      mm_out(view2d(grad_x, rows, v.kernel * d), grad_pre, weight_t);
    } else {
      win2d = view2d(s[kWin], rows, v.kernel * d);
      after_win = torch::stable::matmul(grad_pre, weight_t);
    }
    const Tensor grad_w = torch::stable::to(
        torch::stable::matmul(torch::stable::transpose(win2d, 0, 1), grad_pre), acc);
    unfold_level_grads<T, A>(dev, p, l, v.kernel, grad_w, sums, grad_params);
    after_pooled = grad_pooled;
    after_res = grad_res_pooled;
    after = WindowGrads<T, A>{v, ptr<T>(after_win), ptr<T>(after_pooled), ptr<T>(after_res),
                              ptr<A>(s[kRowStats])};
  }
  InputGradRow<T, A> input{g.length,
                           d,
                           after,
                           ptr_or_null<bool>(mask),
                           !has_residual,
                           mask_aware && has_residual,
                           ptr<T>(grad_x),
                           has_residual ? ptr<T>(grad_res) : nullptr};
  dev.rows(batch * g.length, d, input);
  return {grad_x, grad_res, grad_params};
}

// ------------------------------------------------------------------------ op entries ----

// The op bodies, shared by the CPU and CUDA registrations: validate, then run for the dtype of
// x. `Dev::dispatch(dtype, f)` calls f(T{}, A{}) for a dtype the device supports.
template <class Dev>
ForwardOut downscale_forward(Tensor x, std::optional<Tensor> residual, std::optional<Tensor> mask,
                             Tensor params, std::vector<int64_t> kernels,
                             std::vector<int64_t> strides, int64_t heads, bool mask_aware,
                             std::optional<Tensor> dropout_seed, double dropout, double eps,
                             bool paper_norm, bool return_levels) {
  STD_TORCH_CHECK(x.dim() == 3, "downscale: x must have shape (B, L, D), got ", shape_str(x));
  Dev::check_dtype(x.scalar_type());
  const Geometry g = check_geometry(x.size(0), x.size(1), x.size(2), kernels, strides);
  x = torch::stable::contiguous(x);
  if (residual.has_value()) {
    check_tensor(*residual, "residual", {g.batch, g.length, g.d}, x.scalar_type(), x);
    residual = torch::stable::contiguous(*residual);
  }
  check_mask(mask, mask_aware, g, x);
  if (mask.has_value()) mask = torch::stable::contiguous(*mask);
  check_packed(params, heads, g, x);
  params = torch::stable::contiguous(params);
  STD_TORCH_CHECK(!paper_norm || g.d >= 2, "downscale: paper_norm needs D >= 2, got ", g.d);
  Dev dev(x);
  return Dev::dispatch(x.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const Dropout<A> drop = check_dropout<A>(dropout_seed, dropout, x);
    const Params p = fold_levels<T, A>(dev, g, params, heads);
    const Norm<A> norm{static_cast<A>(eps), paper_norm};
    return forward_levels<T, A>(dev, g, x, residual, mask, p, mask_aware, drop, norm,
                                return_levels);
  });
}

template <class Dev>
BackwardOut downscale_backward(std::optional<Tensor> grad_user, std::vector<Tensor> grad_levels,
                               std::optional<Tensor> x, std::optional<Tensor> mask, Tensor params,
                               std::vector<int64_t> kernels, std::vector<int64_t> strides,
                               int64_t heads, bool mask_aware, bool has_residual,
                               std::optional<Tensor> dropout_seed, double dropout, double eps,
                               bool paper_norm, int64_t length, std::vector<Tensor> saved) {
  STD_TORCH_CHECK(saved.size() >= 3 && saved.back().dim() == 1 && saved[2].dim() == 3,
                  "downscale_backward: saved must be the forward's third output");
  const Tensor& ref = params;
  Dev::check_dtype(ref.scalar_type());
  const Geometry g =
      check_geometry(saved.back().size(0), length, saved[2].size(2), kernels, strides);
  check_packed(params, heads, g, ref);
  params = torch::stable::contiguous(params);
  if (grad_user.has_value()) {
    check_tensor(*grad_user, "grad_user", {g.batch, g.d}, ref.scalar_type(), ref);
    grad_user = torch::stable::contiguous(*grad_user);
  }
  check_mask(mask, mask_aware, g, ref);
  if (mask.has_value()) mask = torch::stable::contiguous(*mask);
  const int64_t m = static_cast<int64_t>(g.levels.size());
  STD_TORCH_CHECK(grad_levels.empty() || static_cast<int64_t>(grad_levels.size()) == m,
                  "downscale_backward: ", grad_levels.size(), " level gradients for ", m,
                  " levels (give none or one per level)");
  for (int64_t l = 0; l < static_cast<int64_t>(grad_levels.size()); ++l) {
    if (grad_levels[l].numel() == 0) continue;
    check_tensor(grad_levels[l], "grad_levels[" + std::to_string(l) + "]",
                 {g.batch, g.levels[l].windows, g.d}, ref.scalar_type(), ref);
    grad_levels[l] = torch::stable::contiguous(grad_levels[l]);
  }
  STD_TORCH_CHECK(static_cast<int64_t>(saved.size()) == kSavedPerLevel * m + 1,
                  "downscale_backward: saved holds ", saved.size(), " tensors, expected ",
                  kSavedPerLevel * m + 1, " (the forward's third output)");
  for (const auto& t : saved)
    STD_TORCH_CHECK(t.is_contiguous() && same_device(t, ref),
                    "downscale_backward: saved tensors must be the forward's own outputs");
  if (saved[kWin].numel() == 0) {  // level 0 read x in place: the backward needs x
    STD_TORCH_CHECK(x.has_value(), "downscale_backward: x is needed (level 0 read it in place)");
    check_tensor(*x, "x", {g.batch, g.length, g.d}, ref.scalar_type(), ref);
    x = torch::stable::contiguous(*x);
  }
  Dev dev(ref);
  return Dev::dispatch(ref.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const Dropout<A> drop = check_dropout<A>(dropout_seed, dropout, ref);
    const Params p = fold_levels<T, A>(dev, g, params, heads);
    const Norm<A> norm{static_cast<A>(eps), paper_norm};
    return backward_levels<T, A>(dev, g, x, grad_user, grad_levels, mask, p, mask_aware,
                                 has_residual, drop, norm, saved);
  });
}

// x (..., D) with level `level`'s dropout under `seed` ((2,) int64), rows = the leading
// dimensions flattened: the stack_dropout op, forward and backward alike.
template <class Dev>
Tensor stack_dropout(Tensor x, Tensor seed, int64_t level, double p) {
  Dev::check_dtype(x.scalar_type());
  STD_TORCH_CHECK(x.dim() >= 1, "stack_dropout: x must have at least one dimension");
  x = torch::stable::contiguous(x);
  Tensor out = torch::stable::empty_like(x);
  const int64_t d = x.size(x.dim() - 1), rows = d == 0 ? 0 : x.numel() / d;
  if (rows == 0) return out;
  Dev dev(x);
  Dev::dispatch(x.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    Dropout<A> drop = check_dropout<A>(seed, p, x, "stack_dropout");
    drop.level = level;
    dev.rows(rows, d, DropoutRow<T, A>{d, drop, ptr<T>(x), ptr<T>(out)});
    return 0;
  });
  return out;
}

// GELU and its derivative elementwise, as the row passes compute them (tests pin the float32
// erf/exp polynomials of downscale.h against float64).
template <class Dev>
std::tuple<Tensor, Tensor> gelu_points(Tensor y) {
  Dev::check_dtype(y.scalar_type());
  y = torch::stable::contiguous(y);
  Tensor value = torch::stable::empty_like(y);
  Tensor grad = torch::stable::empty_like(y);
  Dev dev(y);
  Dev::dispatch(y.scalar_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    dev.columns(y.numel(), GeluPoints<T, A>{ptr<T>(y), ptr<T>(value), ptr<T>(grad)});
    return 0;
  });
  return {value, grad};
}

}  // namespace convrec
