"""mmot's Triton kernels (shipped in the wheel as ``mmot.kernels``).

The CUDA implementations of the ``mmot::`` ops live here, one module per op, each with its
forward and its backward (the exact VJP, computed in the kernel's own reverse passes):

* ``sinkhorn`` and ``multi_sinkhorn``: one streaming pass over the scores per iteration, in a
  stabilised log formulation that is safe for every finite input, so no host-side domain
  decision (and no host sync) is needed and ``log_domain`` changes nothing here.
  One program per problem runs every iteration in a single launch (batches, small problems);
  a large single problem is split over programs with one launch per pass (``_common``). A row
  must fit one tile: ``fits`` says whether a call does, and the op runs the others elsewhere.
* ``similarity``: normalisation fused into the matrix product; the backward reduces over
  broadcast batch dims in registers.

* ``info_nce`` and ``anchor_consistency``: the fused losses (online log-sum-exp over column
  tiles; one elementwise pass with per-program partial sums).

These modules import only ``_common``, torch and triton. Under ``TRITON_INTERPRET=1`` the same
kernels run on CPU tensors; that is how CI tests them.
"""
