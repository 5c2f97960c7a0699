"""``mmot.sspc``: a thin training module that reproduces SSPC on mmot's ops.

SSPC is "Preserving Modality Structure Improves Multi-Modal Learning" (Swetha et al., ICCV 2023,
arXiv 2308.13077). The model is the everything_at_once one (gated token projection, LayerNorm,
one transformer block, masked mean pooling, gated joint projection, per modality); the loss is
the NormSoftmax combinatorial contrastive loss plus SSPC's anchor-consistency terms, whose
targets come from :func:`mmot.multi_sinkhorn` on [queue; batch] anchor scores.

Entry points: the ``mmot-sspc`` CLI (:mod:`mmot.sspc.cli`; also ``python -m mmot.sspc``, which
``torchrun`` starts for data-parallel training, :mod:`mmot.sspc.distributed`), :func:`mmot.sspc.train.train`,
:func:`mmot.sspc.evaluate.evaluate_checkpoint` and :func:`mmot.sspc.reproduce.reproduce`.
"""

__all__ = ["Config", "ConfigError", "load_config"]


def __getattr__(name: str):
    # Lazy, so that ``mmot-sspc`` can report a missing pyyaml itself instead of a traceback.
    if name in __all__:
        from mmot.sspc import config

        return getattr(config, name)
    raise AttributeError(f"module 'mmot.sspc' has no attribute {name!r}")
