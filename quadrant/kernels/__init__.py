"""Triton kernels, each with an asserting launcher and a plain-PyTorch `*_ref` reference.

Triton is needed to launch a kernel (on CUDA, or on CPU under TRITON_INTERPRET=1), not to
import its module: the references serve the CPU path, where Triton may not be installed.
"""
