"""Device kernels: Triton (``@triton.jit`` + launchers) and raw CUDA sources.

Installed as ``distilbert_fast.kernels`` (see ``setup.py``'s ``package_dir``), never as a
top-level ``kernels`` module, which is an unrelated PyPI package.
"""
