"""Triton kernels of the convrec operators, installed as ``convrec.kernels``."""
