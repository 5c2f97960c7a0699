"""Ahead-of-time builds of every Triton kernel for real GPUs, on a machine without one.

``python -m mmot.aot`` drives the Triton launchers of every op (``mmot.kernels``) the way they run
on an A100 (sm_80) or H100 (sm_90), captures the kernel specialisations they ask for
(:mod:`mmot.aot.capture`), compiles each to a cubin with the compiler and ptxas inside the triton
wheel and checks its resources (:mod:`mmot.aot.build`). Which calls it drives is
:mod:`mmot.aot.calls`. See ``docs/gpu.md``.
"""
