"""The torch backend's backward: one explicit reverse pass per op, in plain torch.

Each module's ``backward`` is the exact vector-Jacobian product of the matching
:mod:`mmot.reference` function (the adjoint of the unrolled iteration for the Sinkhorn ops),
written out with the formulas the Rust and Triton kernels use. Nothing here calls autograd, so
the passes run inside a custom op's body on any device. The formulas are in
``docs/gradients.md``; every module's docstring states its own.
"""
