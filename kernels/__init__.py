"""Triton kernels for dlkunet's fused operators, installed as ``dlkunet.kernels``."""
raise ImportError("the Triton kernels are not written yet")
