"""mmot.nn modules: each against the op it wraps or an explicit computation."""

import mmot
import pytest
import torch
import torch.nn.functional as F
from mmot import nn as mnn


def test_anchors_are_cosine_similarities():
    anchors = mnn.Anchors(8, 5)
    x = torch.randn(3, 7, 8)
    want = F.normalize(x, dim=-1) @ F.normalize(anchors.weight, dim=-1).T
    torch.testing.assert_close(anchors(x), want, rtol=1e-5, atol=1e-6)
    anchors(x).sum().backward()
    assert anchors.weight.grad is not None
    with pytest.raises(ValueError, match="'n_anchors'"):
        mnn.Anchors(8, 0)


def test_sinkhorn_modules_match_the_ops():
    scores = torch.randn(12, 6, dtype=torch.float64)
    torch.testing.assert_close(mnn.Sinkhorn(0.1, 4)(scores), mmot.sinkhorn(scores, 0.1, 4))
    torch.testing.assert_close(mnn.MultiSinkhorn(k=2, eps=0.2, n_iters=5)(scores), mmot.multi_sinkhorn(scores, 2, 0.2, 5))


def test_feature_queue_is_a_fifo():
    queue = mnn.FeatureQueue(5, 2)
    assert len(queue) == 0 and not queue.is_full
    queue.push(torch.arange(6.0).view(3, 2))
    torch.testing.assert_close(queue.features(), torch.arange(6.0).view(3, 2))
    queue.push(torch.arange(6.0, 12.0).view(3, 2))
    assert queue.is_full and len(queue) == 5
    torch.testing.assert_close(queue.features(), torch.arange(2.0, 12.0).view(5, 2))  # oldest dropped
    queue.push(torch.arange(100.0, 114.0).view(7, 2))  # more than the size: keep the last 5
    torch.testing.assert_close(queue.features(), torch.arange(104.0, 114.0).view(5, 2))
    x = torch.ones(2, 2, requires_grad=True)
    ext = queue.extend(x)
    assert ext.shape == (7, 2) and ext.requires_grad
    state = queue.state_dict()
    restored = mnn.FeatureQueue(5, 2)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.features(), queue.features())
    with pytest.raises(ValueError, match="'x'"):
        queue.push(torch.ones(2, 3))


def test_norm_softmax_loss_is_info_nce():
    a, b = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    valid = torch.arange(9) != 3
    torch.testing.assert_close(mnn.NormSoftmaxLoss(0.07)(a, b, valid), mmot.info_nce(a, b, 0.07, valid=valid))


def test_combinatorial_loss_weights_and_missing_modalities():
    g = torch.Generator().manual_seed(0)
    emb = {m: torch.randn(10, 6, generator=g, dtype=torch.float64) for m in ("text", "video", "audio")}
    has_audio = torch.arange(10) % 3 != 0
    criterion = mnn.CombinatorialContrastiveLoss()
    got = criterion(emb, masks={"audio": has_audio})
    tv = mmot.info_nce(emb["text"], emb["video"], 0.05)
    ta = mmot.info_nce(emb["text"], emb["audio"], 0.05, valid=has_audio)
    va = mmot.info_nce(emb["video"], emb["audio"], 0.05, valid=has_audio)
    torch.testing.assert_close(got, (tv + 0.1 * ta + 0.1 * va) / 1.2)
    assert set(criterion.last_terms) == {("text", "video"), ("text", "audio"), ("video", "audio")}
    # A missing modality drops its pairs; the remaining weights are renormalised.
    torch.testing.assert_close(criterion({"text": emb["text"], "video": emb["video"]}), tv)
    custom = mnn.CombinatorialContrastiveLoss({("a", "b"): 2.0, ("b", "c"): 1.0}, temperature=0.1)
    e = {"a": emb["text"], "b": emb["video"], "c": emb["audio"]}
    want = (2 * mmot.info_nce(e["a"], e["b"], 0.1) + mmot.info_nce(e["b"], e["c"], 0.1)) / 3
    torch.testing.assert_close(custom(e), want)
    with pytest.raises(ValueError, match="'pair_weights'"):
        mnn.CombinatorialContrastiveLoss({("a", "a"): 1.0})


def _batch(seed, dims, joint_dim=8, batch=6):
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(batch, d, generator=g, dtype=torch.float64, requires_grad=True) for m, d in dims.items()}
    joints = {m: torch.randn(batch, joint_dim, generator=g, dtype=torch.float64, requires_grad=True) for m in dims}
    return inputs, joints


def _explicit_sspc(loss, inputs, joints, input_queue, joint_queue, assign):
    """SSPC's loss written out with plain torch, for the predictions and queues given explicitly."""
    mods = loss.modalities
    batch = joints[mods[0]].shape[0]

    def sim(x, z):
        return F.normalize(x, dim=-1) @ F.normalize(z, dim=-1).T

    z_in = {m: loss.input_anchors[m].weight.double() for m in mods}
    z_joint = {m: loss.joint_anchors[m].weight.double() for m in mods}
    with torch.no_grad():
        t_in = {m: assign(sim(torch.cat([input_queue[m], inputs[m]]), z_in[m]))[-batch:] for m in mods}
        t_joint = {(n, m): assign(sim(torch.cat([joint_queue[n], joints[n]]), z_joint[m]))[-batch:] for n in mods for m in mods}

    def acl(s, t):
        return F.binary_cross_entropy_with_logits(torch.exp(s / 0.1), t)

    def c(m, n):
        return 0.1 if "audio" in (m, n) else 1.0

    total = 0.0
    for m in mods:
        for n in mods:
            total = total + c(m, n) * acl(sim(inputs[m], z_in[m]), t_joint[(n, m)])
            total = total + c(n, m) * acl(sim(joints[n], z_joint[m]), t_in[m])
    return total


@pytest.mark.parametrize("assignment", ["multi", "single"])
def test_sspc_loss_warm_up_and_value(assignment):
    dims = {"video": 7, "audio": 5, "text": 6}
    torch.manual_seed(0)
    loss = mnn.SSPCLoss(dims, joint_dim=8, n_anchors=4, queue_size=12, assignment=assignment).double()
    for q in [*loss.input_queues.values(), *loss.joint_queues.values()]:
        q.storage = q.storage.double()
    # Warm-up: the queues hold 12 rows, the batches 6, so the first two calls are 0 and only fill them.
    for step in range(2):
        inputs, joints = _batch(step, dims)
        assert not loss.warmed_up
        value = loss(inputs, joints)
        assert value.item() == 0.0 and not value.requires_grad
    assert loss.warmed_up
    inputs, joints = _batch(2, dims)
    input_queue = {m: loss.input_queues[m].features().clone() for m in dims}
    joint_queue = {m: loss.joint_queues[m].features().clone() for m in dims}
    got = loss(inputs, joints)
    if assignment == "multi":
        assign = lambda s: mmot.multi_sinkhorn(s, 2, 0.07, 20)  # noqa: E731
    else:  # SwAV's assignment, rows min-max rescaled as Multi-SK's are (like-for-like targets)

        def assign(s):
            t = mmot.sinkhorn(s, 0.07, 20)
            low, high = t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
            return (t - low) / (high - low)

    want = _explicit_sspc(loss, inputs, joints, input_queue, joint_queue, assign)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(loss.last_terms["specific"] + loss.last_terms["cross"], got.detach())
    got.backward()
    assert all(x.grad is not None for x in [*inputs.values(), *joints.values()])
    assert loss.input_anchors["video"].weight.grad is not None and loss.joint_anchors["text"].weight.grad is not None
    # The batch was pushed after the targets were computed.
    torch.testing.assert_close(loss.joint_queues["video"].features()[-6:], joints["video"].detach())


def test_sspc_pair_weights():
    loss = mnn.SSPCLoss({"video": 3, "audio": 3, "text": 3}, joint_dim=4, n_anchors=2, queue_size=2)
    assert loss.pair_weights[("text", "video")] == 1.0 and loss.pair_weights[("video", "video")] == 1.0
    assert loss.pair_weights[("audio", "text")] == 0.1 and loss.pair_weights[("audio", "audio")] == 0.1
    with pytest.raises(ValueError, match="'assignment'"):
        mnn.SSPCLoss({"video": 3}, joint_dim=4, assignment="greedy")
