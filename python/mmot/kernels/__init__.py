"""mmot's Triton kernels (shipped in the wheel as ``mmot.kernels``).

The CUDA implementations of the ``mmot::`` ops live here, one module per op. Until they land,
``backend="auto"`` runs the torch reference on CUDA tensors and ``backend="triton"`` raises.
"""
