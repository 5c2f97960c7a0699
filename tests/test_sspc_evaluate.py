"""mmot.sspc.evaluate: everything_at_once's retrieval metrics, ties averaged; fused queries; the
training-weighted mean over pairs; class-level cR@k (ties averaged) and mAP."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mmot.sspc.config import LossConfig
from mmot.sspc.evaluate import (
    CLASS_METRICS,
    METRICS,
    all_pairs,
    class_ranks_and_ap,
    first_hit_and_ap,
    mean_over_pairs,
    metrics_from_ranks,
    pair_weights,
    ranks,
    ranks_from_similarity,
    retrieval_metrics,
    summarise,
)


def _eao_ranks(sims: np.ndarray) -> np.ndarray:
    """everything_at_once's 'averaging' tie rule, written independently: sort each row's negated
    scores and average the (0-based) positions equal to the true match's, plus 1."""
    out = []
    for i, row in enumerate(sims):
        sorted_neg = np.sort(-row)
        positions = np.flatnonzero(sorted_neg == -row[i])
        out.append(positions.mean() + 1.0)
    return np.array(out)


# ------------------------------------------------------------------------------------ ranks


def test_ties_averaged_on_a_hand_made_similarity_matrix():
    sims = torch.tensor(
        [
            [0.5, 0.5, 0.1, 0.9],  # one above, tied with one other: 1 + (2 + 1) / 2
            [0.2, 0.2, 0.2, 0.2],  # all four tied: (4 + 1) / 2
            [0.0, 0.3, 0.7, 0.1],  # alone at the top
            [0.4, 0.4, 0.9, 0.4],  # one above, tied with two others: 1 + (3 + 1) / 2
        ]
    )
    assert ranks_from_similarity(sims).tolist() == [2.5, 2.5, 1.0, 3.0]  # ties in the query's favour gave [2, 1, 1, 2]
    m = metrics_from_ranks(ranks_from_similarity(sims))
    assert m["R@1"] == 25.0 and m["R@5"] == 100.0 and m["MedR"] == 2.5 and m["MeanR"] == 2.25


def test_recall_counts_averaged_ranks_up_to_k():
    m = metrics_from_ranks(torch.tensor([5.5, 5.0, 1.0, 50.5], dtype=torch.float64))
    assert (m["R@1"], m["R@5"], m["R@10"], m["R@50"]) == (25.0, 50.0, 75.0, 75.0)
    assert m["MedR"] == 5.25 and m["MeanR"] == 15.5
    assert metrics_from_ranks(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))["MedR"] == 2.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.lists(st.integers(-2, 2), min_size=n * n, max_size=n * n).map(lambda v: (n, v))))
def test_ranks_match_everything_at_once_tie_averaging(case):
    n, values = case
    sims = np.array(values, dtype=np.float64).reshape(n, n) / 4  # few distinct values: many ties
    got = ranks_from_similarity(torch.from_numpy(sims))
    np.testing.assert_array_equal(got.numpy(), _eao_ranks(sims))


def test_embedding_ranks_with_exact_ties():
    # 4 queries against 4 gallery items in 2-D; the true match of query i is gallery item i.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.0, -1.0]])
    # q0 → g0 rank 1; q1 → g1 below g2 (rank 2); q2 → g2 below g1 and g0 (rank 3);
    # q3 → g3 = 0 ties with g2 = 0, g0 and g1 are negative: (2 + 1) / 2
    assert ranks(q, g).tolist() == [1.0, 2.0, 3.0, 1.5]
    m = retrieval_metrics(q, g)
    assert m["R@1"] == 25.0 and m["R@5"] == 100.0 and m["MedR"] == 1.75 and m["MeanR"] == 1.875
    # Twelve one-hot queries: one gallery item scores 1 above the true match, the other ten tie with it at 0.
    q = torch.eye(12)
    g = torch.eye(12)[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]]
    assert ranks(q, g).tolist() == [1 + 12 / 2] * 12
    m = retrieval_metrics(q, g)
    assert (m["R@1"], m["R@5"], m["R@10"], m["MedR"]) == (0.0, 0.0, 100.0, 7.0)


def test_blocks_give_the_same_ranks():
    torch.manual_seed(0)
    q, g = torch.randn(37, 5), torch.randn(37, 5)
    torch.testing.assert_close(ranks(q, g, block=8), ranks(q, g))
    want = _eao_ranks((torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(g.double(), dim=1).T).numpy())
    np.testing.assert_array_equal(ranks(q, g).numpy(), want)  # no ties in random data: float32 agrees


# ------------------------------------------------------------------------------------ fused queries


def test_fused_text_to_video_audio_query():
    torch.manual_seed(1)
    video, audio = torch.randn(30, 6), torch.randn(30, 6)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    fused64 = (unit(video.double()) + unit(audio.double())) / 2
    text = (fused64 + 0.3 * torch.randn(30, 6, dtype=torch.float64)).float()
    pairs = all_pairs({"video": video, "text": text, "audio": audio})
    singles = {f"{a}->{b}" for a in ("video", "text", "audio") for b in ("video", "text", "audio") if a != b}
    fused_keys = {"video->text+audio", "text+audio->video", "text->video+audio", "video+audio->text"}
    fused_keys |= {"audio->video+text", "video+text->audio"}
    assert set(pairs) == singles | fused_keys
    # Independent float64 form of the fused query's ranks.
    sims = (unit(text.double()) @ unit(fused64).T).numpy()
    want = _eao_ranks(sims)
    assert pairs["text->video+audio"]["MeanR"] == pytest.approx(want.mean())
    assert pairs["text->video+audio"]["R@1"] == pytest.approx(100.0 * (want <= 1).mean())
    assert pairs["video+audio->text"]["MeanR"] == pytest.approx(_eao_ranks(sims.T).mean())
    # Text was built near the fused embedding: the fused query beats either single modality.
    assert pairs["text->video+audio"]["R@1"] > max(pairs["text->video"]["R@1"], pairs["text->audio"]["R@1"])
    assert set(all_pairs({"a": video, "b": audio})) == {"a->b", "b->a"}  # two modalities: no fused query


# ------------------------------------------------------------------------------------ weighted mean


def test_mean_over_pairs_uses_the_training_weights():
    loss = LossConfig()  # SSPC's weights: text-video 1, text-audio 0.1, video-audio 0.1
    weights = pair_weights(["video", "text", "audio"], loss)
    assert weights == {
        "video->text": 1.0,
        "text->video": 1.0,
        "video->audio": 0.1,
        "audio->video": 0.1,
        "text->audio": 0.1,
        "audio->text": 0.1,
    }
    r1 = {"text->video": 10, "video->text": 20, "text->audio": 30, "audio->text": 40, "video->audio": 50, "audio->video": 60}
    pairs = {k: dict.fromkeys(METRICS, float(v)) for k, v in r1.items()}
    pairs["text->video+audio"] = dict.fromkeys(METRICS, 99.0)  # fused: reported, not averaged in
    mean = mean_over_pairs(pairs, weights)
    assert mean["R@1"] == pytest.approx((10 + 20 + 0.1 * (30 + 40 + 50 + 60)) / 2.4)  # 20.0; the plain mean was 35
    # Pairs the config does not name take default_pair_weight; zero weights drop a pair.
    plain = pair_weights(["x", "y", "z"], LossConfig(pair_weights={"x-y": 0.0}, default_pair_weight=2.0))
    assert plain["x->y"] == plain["y->x"] == 0.0 and plain["z->x"] == 2.0
    with pytest.raises(ValueError, match="loss.pair_weights"):
        mean_over_pairs(pairs, {"text->video": 0.0})


def test_summarise_keeps_the_per_pair_table():
    torch.manual_seed(2)
    emb = {m: torch.randn(20, 4) for m in ("video", "text", "audio")}
    res = summarise(emb, LossConfig())
    assert set(res) == {"pairs", "mean", "weights"} and len(res["pairs"]) == 12 and set(res["mean"]) == set(METRICS)
    assert res["mean"] == pytest.approx(mean_over_pairs(res["pairs"], res["weights"]))


# ------------------------------------------------------------------------------------ class-level metrics


def _first_hit_by_enumeration(row: np.ndarray, relevant: np.ndarray) -> float:
    """The mean, over every order of each tied block, of the 1-based position of the first
    relevant item: enumerated, not the closed form."""
    best = row[relevant].max()
    above = int((row > best).sum())
    block = np.flatnonzero(row == best)
    rel = [j for j, b in enumerate(block) if relevant[b]]
    positions = [min(p[j] for j in rel) for p in itertools.permutations(range(len(block)))]
    return above + 1 + float(np.mean(positions))


def _average_precision(row: np.ndarray, relevant: np.ndarray) -> float:
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))  # ties by gallery order
    hits, total = 0, 0.0
    for pos, j in enumerate(order, start=1):
        if relevant[j]:
            hits += 1
            total += hits / pos
    return total / hits


def test_class_metrics_on_a_hand_made_similarity_matrix():
    sims = torch.tensor(
        [
            [0.9, 0.9, 0.1, 0.5],  # the best same-class item (col 0) tied with col 1 (other class): (2 + 1) / (1 + 1)
            [0.2, 0.8, 0.8, 0.8],  # col 1 and 2 same class, tied with col 3: (3 + 1) / (2 + 1)
            [0.3, 0.7, 0.1, 0.6],  # two items above its class's best: 2 + 1
        ]
    )
    qlab, glab = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1, 2])
    first, ap = first_hit_and_ap(sims, qlab, glab)
    assert first.tolist() == pytest.approx([1.5, 1 + 1 / 3, 3.0])
    # AP, ties by gallery order: row 0 ranks (0, 1, 3, 2): relevant {0} → 1; row 1 ranks (1, 2, 3, 0): {1, 2} → 1;
    # row 2 ranks (1, 3, 0, 2): relevant {0} at 3 → 1/3
    assert ap.tolist() == pytest.approx([1.0, 1.0, 1 / 3])
    qlab2 = torch.tensor([2, 0, 1])  # row 0: class 2 at col 3, row 1: col 0, row 2: cols 1 (top) and 2 (last)
    first, ap = first_hit_and_ap(sims, qlab2, glab)
    assert first.tolist() == pytest.approx([3.0, 4.0, 1.0])
    assert ap.tolist() == pytest.approx([1 / 3, 1 / 4, (1 / 1 + 2 / 4) / 2])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(-2, 2), min_size=n * n, max_size=n * n), st.lists(st.integers(0, 2), min_size=n, max_size=n)
        ).map(lambda v: (n, *v))
    )
)
def test_class_metrics_match_enumerated_tie_orders(case):
    n, values, labels = case
    sims = np.array(values, dtype=np.float64).reshape(n, n) / 4  # many ties
    lab = np.array(labels)
    first, ap = first_hit_and_ap(torch.from_numpy(sims), torch.from_numpy(lab), torch.from_numpy(lab))
    for i in range(n):
        relevant = lab == lab[i]
        assert first[i].item() == pytest.approx(_first_hit_by_enumeration(sims[i], relevant))
        assert ap[i].item() == pytest.approx(_average_precision(sims[i], relevant))


def test_class_metrics_in_the_summary_only_with_labels():
    torch.manual_seed(0)
    emb = {m: torch.randn(30, 4) for m in ("video", "text", "audio")}
    labels = torch.arange(30) % 3
    res = summarise(emb, LossConfig(), labels)
    assert set(res["mean"]) == set(METRICS + CLASS_METRICS) and set(res["pairs"]["text->video+audio"]) == set(METRICS + CLASS_METRICS)
    first, ap = class_ranks_and_ap(emb["text"], emb["video"], labels, block=7)  # blocks give the same answer
    sims = torch.nn.functional.normalize(emb["text"], dim=-1) @ torch.nn.functional.normalize(emb["video"], dim=-1).T
    want_first, want_ap = first_hit_and_ap(sims, labels, labels)
    torch.testing.assert_close(first, want_first)
    torch.testing.assert_close(ap, want_ap)
    assert res["pairs"]["text->video"]["cR@1"] == pytest.approx(float((want_first <= 1).double().mean() * 100))
    assert res["pairs"]["text->video"]["mAP"] == pytest.approx(float(want_ap.mean() * 100))
    assert res["pairs"]["text->video"]["cR@1"] >= res["pairs"]["text->video"]["R@1"]  # the true match is of the class
    assert set(summarise(emb, LossConfig())["mean"]) == set(METRICS)
