"""Reliability of mmot.nn and mmot-sspc: arguments checked up front, safe and clear checkpoint loading."""

import math

import mmot.nn as mnn
import pytest
import torch

# ------------------------------------------------------------------------------------ mmot.nn: constructors


@pytest.mark.parametrize(
    "build, error, match",
    [
        # k beyond the anchors used to fail only at the first step after the queue warm-up
        (
            lambda: mnn.SSPCLoss({"a": 3, "b": 3}, 4, n_anchors=4, queue_size=2, k=5),
            ValueError,
            r"SSPCLoss: argument 'k' must be in 1\.\.4",
        ),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, k=0), ValueError, "SSPCLoss: argument 'k'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, eps=0.0), ValueError, "SSPCLoss: argument 'eps'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, eps=math.nan), ValueError, "SSPCLoss: argument 'eps'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, temperature=-0.1), ValueError, "SSPCLoss: argument 'temperature'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, temperature=math.inf), ValueError, "SSPCLoss: argument 'temperature'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, n_iters=0), ValueError, "SSPCLoss: argument 'n_iters'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, queue_size=0), ValueError, "SSPCLoss: argument 'queue_size'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4.0), TypeError, "SSPCLoss: argument 'joint_dim'"),
        (lambda: mnn.SSPCLoss({"a": 0}, 4), ValueError, r"SSPCLoss: argument 'input_dims\['a'\]'"),
        (lambda: mnn.SSPCLoss([("a", 3)], 4), TypeError, "SSPCLoss: argument 'input_dims'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, backend="cuda"), ValueError, "SSPCLoss: argument 'backend'"),
        (lambda: mnn.SSPCLoss({"a": 3, "b": 3}, 4, pair_weights={("a", "c"): 1.0}), ValueError, "SSPCLoss: argument 'pair_weights'"),
        (lambda: mnn.SSPCLoss({"a": 3, "b": 3}, 4, pair_weights={("a", "b"): math.inf}), ValueError, "SSPCLoss: argument 'pair_weights'"),
        (lambda: mnn.SSPCLoss({"a": 3, "b": 3}, 4, pair_weights={("a", "b"): -1.0}), ValueError, "SSPCLoss: argument 'pair_weights'"),
        # an inf weight used to be accepted and turned the loss into inf/NaN
        (
            lambda: mnn.CombinatorialContrastiveLoss({("a", "b"): math.inf}),
            ValueError,
            "CombinatorialContrastiveLoss: argument 'pair_weights'",
        ),
        (
            lambda: mnn.CombinatorialContrastiveLoss({("a", "b"): math.nan}),
            ValueError,
            "CombinatorialContrastiveLoss: argument 'pair_weights'",
        ),
        (lambda: mnn.CombinatorialContrastiveLoss({("a", "b"): 1.0, ("b", "a"): 1.0}), ValueError, "both orders"),
        (lambda: mnn.CombinatorialContrastiveLoss({("a", "b"): "1"}), TypeError, "CombinatorialContrastiveLoss: argument 'pair_weights'"),
        (lambda: mnn.CombinatorialContrastiveLoss([(("a", "b"), 1.0)]), TypeError, "CombinatorialContrastiveLoss: argument 'pair_weights'"),
        (lambda: mnn.CombinatorialContrastiveLoss(temperature=0), ValueError, "NormSoftmaxLoss: argument 'temperature'"),
        (lambda: mnn.NormSoftmaxLoss(temperature=math.nan), ValueError, "NormSoftmaxLoss: argument 'temperature'"),
        (lambda: mnn.NormSoftmaxLoss(symmetric=1), TypeError, "NormSoftmaxLoss: argument 'symmetric'"),
        (lambda: mnn.NormSoftmaxLoss(backend="gpu"), ValueError, "NormSoftmaxLoss: argument 'backend'"),
        (lambda: mnn.Sinkhorn(eps=-1.0), ValueError, "Sinkhorn: argument 'eps'"),
        (lambda: mnn.Sinkhorn(n_iters=0), ValueError, "Sinkhorn: argument 'n_iters'"),
        (lambda: mnn.Sinkhorn(log_domain="yes"), ValueError, "Sinkhorn: argument 'log_domain'"),
        (lambda: mnn.Sinkhorn(row_masses=None), TypeError, r"Sinkhorn: unknown keyword argument\(s\) \['row_masses'\]"),
        (lambda: mnn.Sinkhorn(row_mass=[1.0, 2.0]), TypeError, "Sinkhorn: argument 'row_mass'"),
        (lambda: mnn.MultiSinkhorn(k=0), ValueError, "MultiSinkhorn: argument 'k'"),
        (lambda: mnn.MultiSinkhorn(eps=math.inf), ValueError, "MultiSinkhorn: argument 'eps'"),
        (lambda: mnn.MultiSinkhorn(low_weight=0.0), ValueError, "MultiSinkhorn: argument 'low_weight'"),
        (lambda: mnn.MultiSinkhorn(slot_weights=[1.0, -1.0]), ValueError, "MultiSinkhorn: argument 'slot_weights'"),
        (lambda: mnn.MultiSinkhorn(normalize="softmax"), ValueError, "MultiSinkhorn: argument 'normalize'"),
        (lambda: mnn.MultiSinkhorn(backend="cuda"), ValueError, "MultiSinkhorn: argument 'backend'"),
        (lambda: mnn.Anchors(8, 4, scale=math.inf), ValueError, "Anchors: argument 'scale'"),
        (lambda: mnn.Anchors(8, 4, backend="tpu"), ValueError, "Anchors: argument 'backend'"),
        (lambda: mnn.Anchors(8.0, 4), TypeError, "Anchors: argument 'dim'"),
        (lambda: mnn.FeatureQueue(4, 2, dtype=torch.int64), TypeError, "FeatureQueue: argument 'dtype'"),
        (lambda: mnn.FeatureQueue(0, 2), ValueError, "FeatureQueue: argument 'size'"),
    ],
)
def test_constructors_check_their_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_sspc_pair_weight_checks_low():
    from mmot.nn.sspc import sspc_pair_weight

    assert sspc_pair_weight("text", "audio", 0.3) == 0.3
    with pytest.raises(ValueError, match="sspc_pair_weight: argument 'low'"):
        sspc_pair_weight("text", "audio", math.inf)


def test_sspc_k_equal_to_anchors_is_accepted_and_runs():
    torch.manual_seed(0)
    loss = mnn.SSPCLoss({"a": 3, "b": 5}, 4, n_anchors=3, queue_size=4, k=3)
    inputs = {"a": torch.randn(4, 3), "b": torch.randn(4, 5)}
    joints = {"a": torch.randn(4, 4), "b": torch.randn(4, 4)}
    assert float(loss(inputs, joints)) == 0.0  # warm-up
    assert torch.isfinite(loss(inputs, joints))


# ------------------------------------------------------------------------------------ mmot.nn: methods


def test_feature_queue_methods_check_their_arguments():
    queue = mnn.FeatureQueue(4, 2)
    with pytest.raises(TypeError, match=r"FeatureQueue\.push: argument 'x' must be a torch\.Tensor"):
        queue.push([[1.0, 2.0]])  # used to raise AttributeError
    with pytest.raises(TypeError, match=r"FeatureQueue\.push: argument 'x' must be a floating tensor"):
        queue.push(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"FeatureQueue\.push: argument 'x' must have shape \(B, 2\)"):
        queue.push(torch.ones(2, 2, 1))
    with pytest.raises(ValueError, match=r"FeatureQueue\.push: argument 'x' must be finite"):
        queue.push(torch.tensor([[1.0, math.nan]]))
    half = mnn.FeatureQueue(4, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"finite in the queue's dtype \(torch\.float16\)"):
        half.push(torch.tensor([[1e5, 1.0]]))  # finite in float32, inf once stored
    assert len(queue) == 0 and len(half) == 0  # nothing half-written
    with pytest.raises(TypeError, match=r"FeatureQueue\.extend: argument 'x'"):
        queue.extend((1.0, 2.0))
    with pytest.raises(ValueError, match=r"FeatureQueue\.extend: argument 'x' must have shape \(B, 2\)"):
        queue.extend(torch.ones(3, 5))
    queue.push(torch.tensor([[0.5, -1.5]]))
    torch.testing.assert_close(
        queue.extend(torch.tensor([[2.0, 3.0]], dtype=torch.float64)), torch.tensor([[0.5, -1.5], [2.0, 3.0]], dtype=torch.float64)
    )


def test_anchors_forward_checks_x():
    anchors = mnn.Anchors(4, 3)
    with pytest.raises(TypeError, match=r"Anchors\.forward: argument 'x'"):
        anchors([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match=r"Anchors\.forward: argument 'x' must have shape \(\.\.\., B, 4\)"):
        anchors(torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"Anchors\.forward: argument 'x' must be a floating tensor"):
        anchors(torch.ones(2, 4, dtype=torch.int32))


def test_combinatorial_forward_checks_its_mappings():
    criterion = mnn.CombinatorialContrastiveLoss({("a", "b"): 1.0})
    with pytest.raises(TypeError, match=r"CombinatorialContrastiveLoss\.forward: argument 'embeddings'"):
        criterion([torch.randn(3, 4), torch.randn(3, 4)])
    with pytest.raises(TypeError, match=r"CombinatorialContrastiveLoss\.forward: argument 'embeddings'.*'b'"):
        criterion({"a": torch.randn(3, 4), "b": [[0.0] * 4] * 3})
    with pytest.raises(TypeError, match=r"CombinatorialContrastiveLoss\.forward: argument 'masks'"):
        criterion({"a": torch.randn(3, 4), "b": torch.randn(3, 4)}, masks=[True, True, False])


def _batch(b=4, dims=None, joint=4):
    dims = dims or {"a": 3, "b": 5}
    return {m: torch.randn(b, d) for m, d in dims.items()}, {m: torch.randn(b, joint) for m in dims}


def test_sspc_forward_checks_the_batch_before_touching_the_queues():
    torch.manual_seed(0)
    loss = mnn.SSPCLoss({"a": 3, "b": 5}, 4, n_anchors=4, queue_size=4)
    inputs, joints = _batch()
    bad_width = dict(inputs, b=torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"SSPCLoss\.forward: argument 'inputs\['b'\]' must have shape \(B, 5\)"):
        loss(bad_width, joints)
    with pytest.raises(ValueError, match=r"SSPCLoss\.forward: every modality's rows must share one batch size"):
        loss(inputs, dict(joints, b=torch.randn(3, 4)))
    with pytest.raises(ValueError, match=r"SSPCLoss\.forward: every modality's rows must share one batch size B >= 1"):
        loss(*_batch(0))
    with pytest.raises(TypeError, match=r"SSPCLoss\.forward: argument 'joints'"):
        loss(inputs, [joints["a"], joints["b"]])
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        loss(inputs, {"a": joints["a"]})
    # No queue was pushed by the rejected calls: the warm-up still needs exactly one full batch.
    assert all(len(q) == 0 for q in [*loss.input_queues.values(), *loss.joint_queues.values()])
    assert float(loss(inputs, joints)) == 0.0 and loss.warmed_up
