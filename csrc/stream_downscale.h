// Row passes of the anchored level stack, the twin of convrec/ops/stream_downscale.py
// (stream_positions_reference): the user vector after every position of left-aligned
// histories in one pass. Like downscale.h it includes no torch header and compiles for both
// devices.
//
// Every level keeps all L positions: slot t of a level holds the version of its open element
// after event t. Level l's input elements cover `span` positions each; element e sits at offset
// e % stride of window e / stride (kernel = stride: windows tile the elements). A position's
// conv-and-Linear pre-activation is the sum of one term per element of its window that has
// arrived: the closed ones (the version at their last position) and its own open one. A term
// is one D x D product with the folded weight of its offset, so the terms of every position
// are one batched GEMM over the positions laid out by offset (SlotPackRow); the row passes
// then add up at most `stride` terms and pool sums per position, and the usual epilogue
// (EpilogueRow) finishes the level.
//
// newest_last (stream_downscale.py): the open window's arrived elements sit in its last slots,
// so the open element always meets the last offset and a closed element's offset moves down
// by one per later arrival. The open terms are then one GEMM with the last offset's weight over
// all positions (dense, row b * L + t). A closed element at place i of its window is read at
// offsets i .. stride - 2 only, so the closed terms are laid out offset-major (ClosedLayout):
// offset o holds the final versions of places 0 .. o, one GEMM per offset, half the products
// of taking every offset of every element.
#pragma once

#include "downscale.h"

namespace convrec {

// One level of the anchored stack, and the slot-packed layout of its GEMM: the positions at
// offset o of every window form matrix o of a (stride, packed_rows, D) tensor, row
// ((o * batch + b) * blocks + window) * span + (t % span); rows past the history are zero.
struct StreamLevel {
  int64_t batch, length;
  int64_t span;  // positions per input element
  int64_t stride;  // elements per window (= kernel)
  int64_t blocks;  // windows per batch row: ceil(length / (span * stride))

  CONVREC_HD int64_t packed_rows() const { return batch * blocks * span; }
  CONVREC_HD int64_t elements() const { return (length + span - 1) / span; }
  CONVREC_HD int64_t end(int64_t element) const { return (element + 1) * span - 1; }
  CONVREC_HD int64_t packed(int64_t b, int64_t t) const {
    const int64_t e = t / span;
    return (((e % stride) * batch + b) * blocks + e / stride) * span + t % span;
  }
};

// newest_last: the final versions of a level's elements by place, (stride, B * blocks, D), row
// (i * batch + b) * blocks + w the element at place i of window w (zero past the last element),
// and the closed terms offset-major: offset o < stride - 1 is a block of (o + 1) * B * blocks
// rows, the final versions of places 0 .. o times that offset's weight, in the same row order.
struct ClosedLayout {
  StreamLevel lv;

  CONVREC_HD int64_t per_place() const { return lv.batch * lv.blocks; }
  CONVREC_HD int64_t final_row(int64_t b, int64_t e) const {
    return ((e % lv.stride) * lv.batch + b) * lv.blocks + e / lv.stride;
  }
  CONVREC_HD int64_t offset_base(int64_t o) const { return per_place() * (o * (o + 1) / 2); }
  CONVREC_HD int64_t rows() const { return offset_base(lv.stride - 1); }
  // The row of element e's (place <= o) term at offset o.
  CONVREC_HD int64_t term_row(int64_t b, int64_t e, int64_t o) const {
    return offset_base(o) + final_row(b, e);
  }
};

// Forward: the level input (B, L, D) in the slot-packed layout, zeros past the history.
template <typename T, typename A>
struct SlotPackRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  StreamLevel lv;
  int64_t d;
  const T* seq;  // (B, L, D)
  T* packed;  // (stride, packed_rows, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* /*scratch*/) const {
    const int64_t rows = lv.packed_rows(), offset = n / rows, rest = n % rows;
    const int64_t b = rest / (lv.blocks * lv.span), window = rest / lv.span % lv.blocks;
    const int64_t t = (window * lv.stride + offset) * lv.span + rest % lv.span;
    fill_slot(team, packed + n * d, t < lv.length ? seq + (b * lv.length + t) * d : nullptr, d);
  }
};

// Forward, position n = (b, t) of a level: the GEMM terms and the input / residual of the
// closed elements of t's window plus t's own -> the pre-activation without its bias, both
// pools and the pool divisor (elements arrived when mask-aware, else the stride).
template <typename T, typename A>
struct StreamWindowRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 3;  // D-vectors of scratch: term, input, residual sums
  StreamLevel lv;
  int64_t d;
  bool mask_aware;
  const T* terms;  // (stride, packed_rows, D): GEMM of the slot-packed input; newest_last: the
                   // open terms, (B * L, D)
  bool newest_last;
  const T* closed;  // newest_last: the closed terms (ClosedLayout)
  const T* seq;  // (B, L, D) level input
  const T* res;  // (B, L, D) long residual, or nullptr: the input itself (level 0)
  T* pre;  // (B * L, D)
  T* pooled;  // (B * L, D)
  T* res_pooled;  // (B * L, D), unused without `res` (then it is `pooled`)
  A* stats;  // writes the divisor

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch) const {
    const int64_t b = n / lv.length, t = n % lv.length, e = t / lv.span, offset = e % lv.stride;
    A* sy = scratch;
    A* sx = scratch + d;
    A* sr = scratch + 2 * d;
    const T* own_term = terms + (newest_last ? n : lv.packed(b, t)) * d;
    const T* own_x = seq + n * d;
    const T* own_r = res != nullptr ? res + n * d : own_x;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) {
      sy[c] = static_cast<A>(own_term[c]);
      sx[c] = static_cast<A>(own_x[c]);
      sr[c] = static_cast<A>(own_r[c]);
    }
    for (int64_t j = e - offset; j < e; ++j) {  // the closed elements of t's window
      const int64_t p = lv.end(j);
      // newest_last: element j sits e - j slots before the open one, at the last offset
      const int64_t row = newest_last ? ClosedLayout{lv}.term_row(b, j, lv.stride - 1 - (e - j))
                                      : lv.packed(b, p);
      const T* term = (newest_last ? closed : terms) + row * d;
      const T* x = seq + (b * lv.length + p) * d;
      const T* r = res != nullptr ? res + (b * lv.length + p) * d : x;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) {
        sy[c] += static_cast<A>(term[c]);
        sx[c] += static_cast<A>(x[c]);
        sr[c] += static_cast<A>(r[c]);
      }
    }
    const A div = pool_divisor<A>(mask_aware, offset + 1, lv.stride);
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) {
      pre[n * d + c] = static_cast<T>(sy[c]);
      pooled[n * d + c] = static_cast<T>(sx[c] / div);
      if (res != nullptr) res_pooled[n * d + c] = static_cast<T>(sr[c] / div);
    }
    if (team.lane() == 0) stats[n * kStats + kStatDiv] = div;
  }
};

// After the last level, the user vector at t is the mean of the last level's closed windows
// (each its version at its last position) and the open one, whose version is the one at t.
// Windows cover `span` positions; window j of batch row b closes at t = (j + 1) span - 1.
// Two passes, so no team walks the L positions of a row: a short sequential scan per batch row
// over its windows (StreamClosedSumsRow), then every position on its own (StreamUserRow).

// Forward, batch row b: closed[b, j] = the sum of the versions of windows 0 .. j - 1 at their
// last position, for j in [0, windows).
template <typename T, typename A>
struct StreamClosedSumsRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 1;  // D-vectors of scratch: the running sum
  int64_t length, span, windows, d;
  const T* last;  // (B, L, D) last level output
  A* closed;  // (B, windows, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t b, A* sum) const {
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) sum[c] = A(0);
    for (int64_t j = 0; j < windows; ++j) {
      A* out = closed + (b * windows + j) * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) out[c] = sum[c];
      if (j + 1 == windows) break;
      const T* end = last + (b * length + (j + 1) * span - 1) * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) sum[c] += static_cast<A>(end[c]);
    }
  }
};

// Forward, position n = b L + t: (closed[b, t / span] + last[n]) / (t / span + 1).
template <typename T, typename A>
struct StreamUserRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  int64_t length, span, windows, d;
  const T* last;  // (B, L, D)
  const A* closed;  // (B, windows, D)
  T* user;  // (B, L, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* /*scratch*/) const {
    const int64_t b = n / length, j = (n % length) / span;
    const A count = A(j + 1);
    const A* sum = closed + (b * windows + j) * d;
    const T* row = last + n * d;
    T* out = user + n * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size)
      out[c] = static_cast<T>((sum[c] + static_cast<A>(row[c])) / count);
  }
};

// Backward, window r = b windows + j: own[r] = the sum over its positions t of
// grad_user[b, t] / (j + 1).
template <typename T, typename A>
struct StreamUserWindowSumsRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  int64_t length, span, windows, d;
  const T* grad_user;  // (B, L, D)
  A* own;  // (B, windows, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t r, A* /*scratch*/) const {
    const int64_t b = r / windows, j = r % windows;
    const int64_t first = j * span, end = first + span < length ? first + span : length;
    const A count = A(j + 1);
    A* out = own + r * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) out[c] = A(0);
    for (int64_t t = first; t < end; ++t) {
      const T* g = grad_user + (b * length + t) * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) out[c] += static_cast<A>(g[c]);
    }
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) out[c] /= count;
  }
};

// Backward, batch row b: own[b, j] becomes the sum of own[b, j'] over the later windows
// j' > j (what the last position of window j receives), in place, a scan from the last.
template <typename A>
struct StreamLaterWindowsRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 1;  // D-vectors of scratch: the running sum
  int64_t windows, d;
  A* own;  // (B, windows, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t b, A* sum) const {
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) sum[c] = A(0);
    for (int64_t j = windows - 1; j >= 0; --j) {
      A* w = own + (b * windows + j) * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) {
        const A mine = w[c];
        w[c] = sum[c];
        sum[c] += mine;
      }
    }
  }
};

// Backward, position n = b L + t: grad_user[n] / (t / span + 1), plus at the last position of
// a closed window j the later windows' sum (StreamLaterWindowsRow).
template <typename T, typename A>
struct StreamUserGradRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  int64_t length, span, windows, d;
  const T* grad_user;  // (B, L, D)
  const A* later;  // (B, windows, D)
  T* grad_last;  // (B, L, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* /*scratch*/) const {
    const int64_t b = n / length, t = n % length, j = t / span;
    const A count = A(j + 1), with_later = (t + 1) % span == 0 ? A(1) : A(0);
    const A* l = later + (b * windows + j) * d;
    const T* g = grad_user + n * d;
    T* out = grad_last + n * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size)
      out[c] = static_cast<T>(static_cast<A>(g[c]) / count + with_later * l[c]);
  }
};

// Backward: the gradients reaching one position of a level's output from what read it, for
// EpilogueGradRow (the twin of WindowGrads): directly (the next level's pools, or the user
// vectors), through the next level's GEMM terms (slot-packed, `lv` is that level) and as the
// next level's long residual.
template <typename T, typename A>
struct StreamGrads {
  StreamLevel lv;
  const T* direct;  // (B, L, D)
  const T* terms;  // (stride, packed_rows, D) or nullptr; newest_last: the open terms', (B, L, D)
  const T* res;  // (B, L, D) or nullptr
  bool newest_last = false;
  // newest_last: the closed terms' input gradients, per offset (ClosedLayout), which an
  // element's final position sums over the offsets it was read at
  const T* finals = nullptr;

  template <class Team>
  CONVREC_HD void gather(const Team& team, int64_t b, int64_t t, int64_t d, A* dx, A* dr) const {
    const int64_t n = b * lv.length + t;
    const T* g = direct + n * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) dx[c] += static_cast<A>(g[c]);
    if (terms != nullptr) {
      const T* gt = terms + (newest_last ? n : lv.packed(b, t)) * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) dx[c] += static_cast<A>(gt[c]);
    }
    const int64_t e = t / lv.span;
    if (newest_last && t == lv.end(e)) {  // an element's final version
      const ClosedLayout at{lv};
      for (int64_t o = e % lv.stride; o < lv.stride - 1; ++o) {
        const T* gf = finals + at.term_row(b, e, o) * d;
        CONVREC_SIMD
        for (int64_t c = team.lane(); c < d; c += Team::size) dx[c] += static_cast<A>(gf[c]);
      }
    }
    if (res != nullptr) {
      const T* gr = res + n * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) dr[c] += static_cast<A>(gr[c]);
    }
  }
};

// Backward, element (b, e) of a level's input: the sums over its positions of the gradients
// of the pre-activation and of both pools (divided by their divisor): what the element's last
// position receives from each later position of its window.
template <typename T, typename A>
struct StreamElementSumRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  StreamLevel lv;
  int64_t d;
  const T* grad_pre;  // (B * L, D)
  const T* grad_pooled;
  const T* grad_res_pooled;
  const A* stats;
  A* sums;  // (B * elements, 3, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* /*scratch*/) const {
    const int64_t count = lv.elements(), b = n / count, e = n % count;
    const int64_t first = e * lv.span, stop = first + lv.span < lv.length ? first + lv.span
                                                                         : lv.length;
    A* sy = sums + n * 3 * d;
    A* sx = sy + d;
    A* sr = sy + 2 * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) sy[c] = sx[c] = sr[c] = A(0);
    for (int64_t t = first; t < stop; ++t) {
      const int64_t row = b * lv.length + t;
      const A div = stats[row * kStats + kStatDiv];
      const T* gy = grad_pre + row * d;
      const T* gx = grad_pooled + row * d;
      const T* gr = grad_res_pooled + row * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) {
        sy[c] += static_cast<A>(gy[c]);
        sx[c] += static_cast<A>(gx[c]) / div;
        sr[c] += static_cast<A>(gr[c]) / div;
      }
    }
  }
};

// Backward of StreamWindowRow at position n = (b, t): its own gradients plus, at an element's
// last position, the element sums of the later elements of its window. Writes the gradient of
// t's GEMM term (slot-packed, for the GEMMs), of t's input through the pools and of t's long
// residual.
template <typename T, typename A>
struct StreamWindowGradRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 3;  // D-vectors of scratch: term, input, residual
  StreamLevel lv;
  int64_t d;
  const T* grad_pre;  // (B * L, D)
  const T* grad_pooled;
  const T* grad_res_pooled;
  const A* stats;
  const A* sums;  // StreamElementSumRow's
  T* grad_terms;  // (stride, packed_rows, D), zero past the history; nullptr: newest_last,
                   // whose term gradients are grad_pre and StreamClosedGradRow's
  T* grad_input;  // (B, L, D): through the pools
  T* grad_res;  // (B, L, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch) const {
    const int64_t b = n / lv.length, t = n % lv.length, e = t / lv.span;
    const int64_t count = lv.elements();
    const int64_t window_end = e - e % lv.stride + lv.stride;
    const int64_t stop = window_end < count ? window_end : count;
    const A div = stats[n * kStats + kStatDiv];
    A* gy = scratch;
    A* gx = scratch + d;
    A* gr = scratch + 2 * d;
    const T* own_y = grad_pre + n * d;
    const T* own_x = grad_pooled + n * d;
    const T* own_r = grad_res_pooled + n * d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) {
      gy[c] = static_cast<A>(own_y[c]);
      gx[c] = static_cast<A>(own_x[c]) / div;
      gr[c] = static_cast<A>(own_r[c]) / div;
    }
    if (t == lv.end(e)) {  // the element closes here: later positions of the window read it
      for (int64_t j = e + 1; j < stop; ++j) {
        const A* s = sums + (b * count + j) * 3 * d;
        CONVREC_SIMD
        for (int64_t c = team.lane(); c < d; c += Team::size) {
          gy[c] += s[c];
          gx[c] += s[d + c];
          gr[c] += s[2 * d + c];
        }
      }
    }
    if (grad_terms != nullptr) {
      T* out_y = grad_terms + lv.packed(b, t) * d;
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) out_y[c] = static_cast<T>(gy[c]);
    }
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) {
      grad_input[n * d + c] = static_cast<T>(gx[c]);
      grad_res[n * d + c] = static_cast<T>(gr[c]);
    }
  }
};

// newest_last, row n of the by-place final versions (ClosedLayout): the version of that
// element at its last position, or at the last position while it is still open (nothing reads
// that one), zeros past the last element.
template <typename T, typename A>
struct StreamFinalsRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  StreamLevel lv;
  int64_t d;
  const T* seq;  // (B, L, D)
  T* finals;  // (stride * B * blocks, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* /*scratch*/) const {
    const int64_t per_place = lv.batch * lv.blocks, place = n / per_place;
    const int64_t b = n % per_place / lv.blocks, e = n % lv.blocks * lv.stride + place;
    const int64_t end = lv.end(e), t = end < lv.length ? end : lv.length - 1;
    fill_slot(team, finals + n * d, e < lv.elements() ? seq + (b * lv.length + t) * d : nullptr,
              d);
  }
};

// newest_last backward, row n of the closed terms (ClosedLayout): the gradient of one closed
// term. The element at place s of a window reads the earlier element at place i at offset
// stride - 1 - (s - i) with every position of its own, so the term of place i at offset o gets
// the summed pre-activation gradient of the element stride - 1 - o places later
// (StreamElementSumRow's), when that one exists; zero otherwise.
template <typename T, typename A>
struct StreamClosedGradRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 0;
  StreamLevel lv;
  int64_t d;
  const A* sums;  // StreamElementSumRow's
  T* grad_closed;  // (ClosedLayout rows, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* /*scratch*/) const {
    const ClosedLayout at{lv};
    int64_t o = 0;  // the offset block holding row n
    while (at.offset_base(o + 1) <= n) ++o;
    const int64_t row = n - at.offset_base(o), per_place = at.per_place();
    const int64_t place = row / per_place, b = row % per_place / lv.blocks;
    const int64_t reader = row % lv.blocks * lv.stride + place + lv.stride - 1 - o;
    T* out = grad_closed + n * d;
    if (reader < lv.elements()) {
      const A* s = sums + (b * lv.elements() + reader) * 3 * d;  // pre-activation sums first
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) out[c] = static_cast<T>(s[c]);
    } else {
      CONVREC_SIMD
      for (int64_t c = team.lane(); c < d; c += Team::size) out[c] = T(0);
    }
  }
};

// Backward, position n of level 0's input: x is both the input and the long residual.
template <typename T, typename A>
struct StreamInputGradRow {
  using acc = A;
  static constexpr int64_t scratch_rows = 2;  // D-vectors of scratch: input, residual
  int64_t length, d;
  StreamGrads<T, A> first;
  T* grad_x;  // (B, L, D)

  template <class Team>
  CONVREC_HD void operator()(const Team& team, int64_t n, A* scratch) const {
    A* dx = scratch;
    A* dr = scratch + d;
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size) dx[c] = dr[c] = A(0);
    first.gather(team, n / length, n % length, d, dx, dr);
    CONVREC_SIMD
    for (int64_t c = team.lane(); c < d; c += Team::size)
      grad_x[n * d + c] = static_cast<T>(dx[c] + dr[c]);
  }
};

}  // namespace convrec
