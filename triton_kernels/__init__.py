"""Triton kernels of longkernels, installed as ``longkernels.triton_kernels``."""
