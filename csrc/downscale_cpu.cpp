// CPU kernel of the downscale op: the row passes of downscale.h run one row per thread
// iteration under at::parallel_for (through the stable ABI), channels innermost so the compiler
// vectorises them. float32 and float64 (float64 for gradcheck).
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "bags_of_rows.h"
#include "downscale_driver.h"
#include "embedding_rows.h"
#include "gelu_paper_norm_driver.h"
#include "rows_with_context.h"
#include "stream_downscale_driver.h"

namespace convrec {
namespace {

// One thread owns a whole row: lane 0 of a team of 1, and a sum is the value itself.
struct SerialTeam {
  static constexpr int size = 1;
  constexpr int64_t lane() const { return 0; }
  template <typename A>
  constexpr A sum(A v) const {
    return v;
  }
};

// The row loops are compiled for AVX-512 and AVX2 as well as the baseline, and the loader picks
// one per machine (GCC ifunc). Only these loops are cloned; anything they do not inline runs
// baseline code, so no wider instruction leaks into shared inline functions.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && !defined(__clang__) && \
    __GNUC__ >= 11
#define CONVREC_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CONVREC_CPU_CLONES
#endif

template <class Row>
CONVREC_CPU_CLONES void run_rows(const Row& row, int64_t begin, int64_t end,
                                 typename Row::acc* scratch) {
  for (int64_t r = begin; r < end; ++r) row(SerialTeam{}, r, scratch);
}

// Rows per partial-sum slot: fixed, so gradient sums do not depend on the thread count.
constexpr int64_t kRowsPerSlot = 16;

template <class Row, typename A>
CONVREC_CPU_CLONES void run_slots(const Row& row, int64_t n, int64_t begin, int64_t end,
                                  A* scratch, A* table, int64_t d) {
  for (int64_t slot = begin; slot < end; ++slot) {
    Partials<A> part = partials_at(table, slot, d);
    const int64_t last = std::min(n, (slot + 1) * kRowsPerSlot);
    for (int64_t r = slot * kRowsPerSlot; r < last; ++r) row(SerialTeam{}, r, scratch, part);
    store_scalars(table, slot, d, part.alpha, part.beta);
  }
}

// Work below this many scalar steps per task is not worth a thread hand-off.
constexpr int64_t kGrainSteps = 1 << 14;

class CpuDevice {
 public:
  static constexpr bool kChecksMaskOnHost = true;

  explicit CpuDevice(const Tensor& /*ref*/) {}

  static void check_dtype(ScalarType t) {
    STD_TORCH_CHECK(t == ScalarType::Float || t == ScalarType::Double,
                    "downscale on CPU supports float32 and float64, got ",
                    torch::headeronly::toString(t));
  }

  template <class F>
  static auto dispatch(ScalarType t, F&& f) {
    if (t == ScalarType::Double) return f(double{}, double{});
    return f(float{}, float{});
  }

  // Runs row(team, r, scratch) for r in [0, n); D = d.
  template <class Row>
  void rows(int64_t n, int64_t d, const Row& row) const {
    const int64_t width = Row::scratch_rows * d;
    const int64_t grain = std::max<int64_t>(1, kGrainSteps / std::max(width, d));
    torch::stable::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      std::vector<typename Row::acc> scratch(width);
      run_rows(row, begin, end, scratch.data());
    });
  }

  int64_t slots(int64_t n, int64_t /*scratch_bytes*/) const {
    return (n + kRowsPerSlot - 1) / kRowsPerSlot;
  }

  // Runs row(team, r, scratch, partials of r's slot) for r in [0, n).
  template <class Row, typename A>
  void grad_rows(int64_t n, int64_t d, const Row& row, A* table, int64_t slots) const {
    const int64_t width = Row::scratch_rows * d;
    const int64_t grain = std::max<int64_t>(1, kGrainSteps / (width * kRowsPerSlot));
    torch::stable::parallel_for(0, slots, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(width);
      run_slots(row, n, begin, end, scratch.data(), table, d);
    });
  }

  // Whether x (positions, D) is zero at every position the mask leaves out.
  template <typename T>
  bool zero_where_masked(const T* x, const bool* mask, int64_t positions, int64_t d) const {
    std::atomic<bool> zero{true};
    torch::stable::parallel_for(0, positions, kGrainSteps / d + 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end && zero.load(std::memory_order_relaxed); ++n) {
        if (mask[n]) continue;
        for (int64_t c = 0; c < d; ++c)
          if (x[n * d + c] != T(0)) zero.store(false, std::memory_order_relaxed);
      }
    });
    return zero.load();
  }

  // Runs f(i) for i in [0, n), at least `grain` per task (1: a few large independent blocks).
  template <class F>
  void columns(int64_t n, const F& f, int64_t grain = 16) const {
    torch::stable::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(convrec, CPU, m) {
  m.impl("downscale", TORCH_BOX(&downscale_forward<CpuDevice>));
  m.impl("downscale_backward", TORCH_BOX(&downscale_backward<CpuDevice>));
  m.impl("gelu_points", TORCH_BOX(&gelu_points<CpuDevice>));
  m.impl("gelu_paper_norm", TORCH_BOX(&gelu_paper_norm<CpuDevice>));
  m.impl("gelu_paper_norm_backward", TORCH_BOX(&gelu_paper_norm_backward<CpuDevice>));
  m.impl("stack_dropout", TORCH_BOX(&stack_dropout<CpuDevice>));
  m.impl("bags_of_rows_backward", TORCH_BOX(&bags_of_rows_backward<CpuDevice>));
  m.impl("embedding_rows_backward", TORCH_BOX(&embedding_rows_backward<CpuDevice>));
  m.impl("rows_with_context", TORCH_BOX(&rows_with_context<CpuDevice>));
  m.impl("stream_downscale", TORCH_BOX(&stream_downscale_forward<CpuDevice>));
  m.impl("stream_downscale_backward", TORCH_BOX(&stream_downscale_backward<CpuDevice>));
}

}  // namespace convrec
