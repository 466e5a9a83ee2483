// Schemas of the convrec ops implemented in C++, declared once; the CPU and CUDA files register
// their kernels under the CPU and CUDA keys, Python adds fake and autograd implementations
// (convrec/ops/downscale_ext.py). Also the module init that lets `import convrec._C` load
// this library with the limited Python API (one _C.abi3.so for every CPython >= 3.10).
#include <Python.h>
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(convrec, m) {
  // Forward over all levels. `params` holds every level's parameters packed (LevelLayout in
  // downscale.h; convrec/ops/level_params.py). With `dropout_seed` ((2,) int64) the epilogues
  // drop elements by a hash of the seed (Dropout in downscale.h). `paper_norm` normalises with
  // the paper code's LayerNorm (Norm in downscale.h). Returns the user vectors
  // (B, D), the level outputs (all of them with return_levels, else the last) and the tensors
  // the backward needs, opaque to callers.
  m.def(
      "downscale(Tensor x, Tensor? residual, Tensor? mask, Tensor params, int[] kernels, "
      "int[] strides, int heads, bool mask_aware, Tensor? dropout_seed, float dropout, "
      "float eps, bool paper_norm, bool return_levels) -> (Tensor, Tensor[], Tensor[])");
  // Gradients of x, the residual (empty without one) and the packed parameters. A missing
  // grad_user and empty entries of grad_levels mean zero. x is needed only when the forward
  // read it in place (saved[0] empty).
  m.def(
      "downscale_backward(Tensor? grad_user, Tensor[] grad_levels, Tensor? x, Tensor? mask, "
      "Tensor params, int[] kernels, int[] strides, int heads, bool mask_aware, "
      "bool has_residual, Tensor? dropout_seed, float dropout, float eps, bool paper_norm, "
      "int length, Tensor[] saved) "
      "-> (Tensor, Tensor, Tensor)");
  // The anchored stack (csrc/stream_downscale_driver.h): left-aligned histories x (B, L, D)
  // -> the user vector after every position (B, L, D), and the tensors the backward needs.
  // Kernel = stride at every level; `params` packed as for downscale. `newest_last` lays each
  // level's open window out with its arrived elements in the last slots.
  m.def(
      "stream_downscale(Tensor x, Tensor params, int[] strides, int heads, bool mask_aware, "
      "Tensor? dropout_seed, float dropout, float eps, bool newest_last) -> (Tensor, Tensor[])");
  // Gradients of x and of the packed parameters.
  m.def(
      "stream_downscale_backward(Tensor grad, Tensor params, int[] strides, int heads, "
      "Tensor? dropout_seed, float dropout, float eps, bool newest_last, Tensor[] saved) "
      "-> (Tensor, Tensor)");
  // Dropout of x (..., D) by the hash of (seed, level, row, channel) (Dropout in downscale.h):
  // kept elements scaled by 1 / (1 - p). Linear and self-adjoint: its backward is itself.
  m.def("stack_dropout(Tensor x, Tensor seed, int level, float p) -> Tensor");
  // paper_layer_norm(dropout(GELU(x))) over x's last dim (csrc/gelu_paper_norm_driver.h), the
  // paper code's input block; with `dropout_seed` StackDropout's level 0 over x's rows. Returns
  // y and the (rows, 2) statistics its backward reads.
  m.def(
      "gelu_paper_norm(Tensor x, Tensor weight, Tensor bias, Tensor? dropout_seed, float dropout, "
      "float eps) -> (Tensor, Tensor)");
  // Gradients of x, weight and bias.
  m.def(
      "gelu_paper_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor stats, "
      "Tensor? dropout_seed, float dropout, float eps) -> (Tensor, Tensor, Tensor)");
  // The table's gradient (table_rows, D) from the gradient (R, D) of bags of its rows: bag r
  // sums rows picked[offsets[r] .. offsets[r + 1]) (csrc/bags_of_rows.h; CPU only; the forward,
  // convrec::bags_of_rows, is defined in Python over ATen's embedding_bag).
  m.def(
      "bags_of_rows_backward(Tensor grad, Tensor offsets, Tensor picked, int table_rows) "
      "-> Tensor");
  // The table's gradient (table_rows, D) from the gradient (R, D) of its rows ids (R,): zero
  // but at the picked rows, nothing at padding_idx (< 0: none) (csrc/embedding_rows.h; CPU
  // only; the forward, convrec::embedding_rows, is defined in Python over ATen's embedding).
  m.def(
      "embedding_rows_backward(Tensor grad, Tensor ids, int table_rows, int padding_idx) "
      "-> Tensor");
  // Position n of the faithful item encoder's dropped fused vectors: StackDropout's level 0 of
  // table[where[n]] + weight @ context[n] (csrc/rows_with_context.h; CPU only): table (R, W),
  // where (N,), context (N, K) or none, weight (W, K) -> (N, W). Its backward is composed in
  // Python (convrec/ops/rows_with_context.py).
  m.def(
      "rows_with_context(Tensor table, Tensor where, Tensor? context, Tensor weight, "
      "Tensor? dropout_seed, float dropout) -> Tensor");
  // GELU(y) and GELU'(y) with the kernels' arithmetic, for tests of the float32 polynomials.
  m.def("gelu_points(Tensor y) -> (Tensor, Tensor)");
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "convrec C++/CUDA operators (torch.ops.convrec.*)", -1, nullptr};
  return PyModule_Create(&module);
}
