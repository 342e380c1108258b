"""Triton kernels of pndm_fast, installed as ``pndm_fast.kernels`` (see setup.py's package_dir).

Importing a kernel module needs triton; ``pndm_fast.ops`` guards that import so the package works without it.
"""
