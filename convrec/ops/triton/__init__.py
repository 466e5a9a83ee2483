"""Triton kernels of the convrec operators, one module per op (launch.py: tile configs).

Imported lazily by name (``convrec.ops.dispatch.triton_kernels``), so convrec imports without
Triton installed. The kernels know nothing of models; ``convrec.ops.<op>`` wraps each as a
``torch.library`` custom op.
"""
