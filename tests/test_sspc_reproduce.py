"""mmot-sspc reproduce: the paired difference and its 95% t interval, and a tiny run of both test
beds through the command's outputs (rows with testbed and q, paired rows, tables)."""

import json
import math
import statistics

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mmot.sspc.stats import paired_difference, t975

TINY_CONCEPTS = """
name: concepts_tiny
data:
  format: concepts
  clips_per_video: 4
  concepts: {n_super: 5, concepts_per_super: 3, train_super: 3, train_videos: 2, test_videos: 2, ood_videos: 2,
             min_clips: 4, max_clips: 5, latent_dim: 6, hidden: 12, token_dim: {video: 6, text: 5, audio: 4},
             min_tokens: 2, max_tokens: 3}
model: {d_model: 8, embed_dim: 8, n_heads: 2, mlp_ratio: 1.0, n_anchors: 4}
loss: {mk_iters: 3, sk_iters: 3}
train: {epochs: 1, batch_size: 16, lr: 1.0e-3, num_threads: 1, progress: false, eval_every: 0, max_steps: 3}
"""
TINY_UCI = """
name: uci_tiny
data: {format: uci, classes_per_fold: 2}
model: {d_model: 8, embed_dim: 8, n_heads: 2, mlp_ratio: 1.0, n_anchors: 4}
loss: {mk_iters: 3, sk_iters: 3}
train: {epochs: 1, batch_size: 64, lr: 1.0e-3, num_threads: 1, progress: false, eval_every: 0, max_steps: 2}
"""


def test_t975_matches_known_quantiles():
    assert t975(1) == 12.706 and t975(4) == 2.776 and t975(30) == 2.042
    assert t975(60) == pytest.approx(2.000298, abs=5e-4) and t975(10_000) == pytest.approx(1.96020, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 200):
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=5e-4)
    with pytest.raises(ValueError, match="t975: argument 'df' must be >= 1"):
        t975(0)


def test_paired_difference_by_hand():
    d = paired_difference([10.0, 11.0, 12.0, 13.0, 14.0], [11.0, 13.0, 15.0, 17.0, 19.0])  # diffs 1..5
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975,4} · s / √n, s² = 2.5
    assert d["mean"] == 3.0 and d["n"] == 5
    assert d["lo"] == pytest.approx(3.0 - half) and d["hi"] == pytest.approx(3.0 + half)
    one = paired_difference([1.0], [4.0])
    assert one == {"mean": 3.0, "lo": None, "hi": None, "n": 1}
    with pytest.raises(ValueError, match="paired_difference: expected two equally long"):
        paired_difference([1.0, 2.0], [1.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=2, max_size=12))
def test_paired_difference_is_a_t_interval_on_the_differences(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    d = paired_difference(a, b)
    diffs = [y - x for x, y in pairs]
    n = len(diffs)
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    assert d["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-9)
    assert d["lo"] == pytest.approx(d["mean"] - half, abs=1e-9) and d["hi"] == pytest.approx(d["mean"] + half, abs=1e-9)
    # shifting both variants alike leaves the paired difference unchanged (unlike two unpaired means)
    shifted = paired_difference([x + 7.0 for x in a], [y + 7.0 for y in b])
    assert shifted["hi"] - shifted["lo"] == pytest.approx(d["hi"] - d["lo"], abs=1e-6)


def test_tiny_reproduce_on_both_test_beds(tmp_path):
    from mmot.sspc.reproduce import reproduce

    (tmp_path / "c.yaml").write_text(TINY_CONCEPTS)
    (tmp_path / "u.yaml").write_text(TINY_UCI)
    common = {"n_seeds": 2, "progress": False, "variants": ("contrastive", "multi_sk"), "jobs": 1}
    out_c, out_u = tmp_path / "c", tmp_path / "u"
    res = reproduce(out_dir=str(out_c), config=str(tmp_path / "c.yaml"), testbeds=("concepts",), q_levels=(0.0, 0.4), **common)
    rows = res["rows"]
    assert {(r["testbed"], r["q"]) for r in rows} == {("concepts", 0.0), ("concepts", 0.4)}
    assert {r["split"] for r in rows} == {"test", "ood", "ood_shift"} and {r["query"] for r in rows} == {"mean", "text->video+audio"}
    assert {"R@1", "MedR", "cR@1", "mAP"} <= {r["metric"] for r in rows}
    assert all(r["seeds"] == [0, 1] and len(r["values"]) == 2 for r in rows)
    # a paired row is the per-seed difference of the two variants' rows
    for p in [p for p in res["paired"] if p["metric"] == "R@1" and p["query"] == "mean"]:
        assert p["variant"] == "multi_sk" and p["baseline"] == "contrastive"
        pick = {
            r["variant"]: r["values"] for r in rows if (r["q"], r["split"], r["metric"], r["query"]) == (p["q"], p["split"], "R@1", "mean")
        }
        assert p["values"] == pytest.approx([b - a for a, b in zip(pick["contrastive"], pick["multi_sk"])])
        assert p["lo"] <= p["mean"] <= p["hi"]
    saved = json.loads((out_c / "results.json").read_text())
    assert saved["settings"]["q_levels"] == {"concepts": [0.0, 0.4]} and saved["per_pair"]["concepts"]["0.4"]["multi_sk"]["1"]["ood"]
    md = (out_c / "results.md").read_text()
    assert "| 0.4 | + SSPC (Multi-SK) |" in md and "SSPC − contrastive, paired by seed" in md
    assert (out_c / "results.png").stat().st_size > 1000
    assert set(res["step_time_ms"]) == {"mmot", "official_dense"} and "official-dense" in md
    # seed s: world s and init s on concepts; fold s mod 5 on uci
    run = yaml.safe_load((out_c / "runs" / "concepts" / "q0.4" / "multi_sk_seed1" / "config.yaml").read_text())
    assert run["data"]["concepts"]["seed"] == 1 and run["train"]["seed"] == 1 and run["data"]["pair_noise"] == 0.4

    res = reproduce(out_dir=str(out_u), config=str(tmp_path / "u.yaml"), testbeds=("uci",), q_levels=(0.2,), time_steps=False, **common)
    assert {(r["testbed"], r["q"]) for r in res["rows"]} == {("uci", 0.2)} and {r["split"] for r in res["rows"]} == {"test", "ood"}
    run = yaml.safe_load((out_u / "runs" / "uci" / "q0.2" / "contrastive_seed1" / "config.yaml").read_text())
    assert run["data"]["ood_fold"] == 1 and run["train"]["seed"] == 1
    with pytest.raises(Exception, match="one test bed"):
        reproduce(out_dir=str(out_u), config=str(tmp_path / "u.yaml"), **common)


def test_resume_finishes_an_interrupted_reproduce(tmp_path):
    from mmot.sspc.config import ConfigError
    from mmot.sspc.reproduce import reproduce

    (tmp_path / "u.yaml").write_text(TINY_UCI)
    common = {
        "config": str(tmp_path / "u.yaml"),
        "testbeds": ("uci",),
        "q_levels": (0.0,),
        "variants": ("contrastive", "multi_sk"),
        "progress": False,
        "jobs": 1,
        "time_steps": False,
    }
    whole = reproduce(out_dir=str(tmp_path / "whole"), n_seeds=2, **common)
    reproduce(out_dir=str(tmp_path / "cut"), n_seeds=1, **common)  # an interrupted run: seed 1 missing
    with pytest.raises(FileExistsError, match="already holds a run"):
        reproduce(out_dir=str(tmp_path / "cut"), n_seeds=2, **common)
    resumed = reproduce(out_dir=str(tmp_path / "cut"), n_seeds=2, resume=True, **common)
    assert [r["values"] for r in resumed["rows"]] == [r["values"] for r in whole["rows"]]
    with pytest.raises(ConfigError, match="exclude each other"):
        reproduce(out_dir=str(tmp_path / "cut"), n_seeds=2, resume=True, overwrite=True, **common)


def test_structure_methods_in_one_table(tmp_path):
    """Every structure variant runs in reproduce on the same data as SSPC, and lands in the same
    tables and paired rows, with the modality gap and ucR@1 as columns."""
    from mmot.sspc.reproduce import reproduce

    (tmp_path / "c.yaml").write_text(TINY_CONCEPTS)
    variants = ("contrastive", "multi_sk", "gc", "bridge", "separation", "c3", "multi_sk+gc")
    res = reproduce(
        out_dir=str(tmp_path / "s"),
        config=str(tmp_path / "c.yaml"),
        testbeds=("concepts",),
        q_levels=(0.0,),
        variants=variants,
        n_seeds=1,
        progress=False,
        jobs=1,
        time_steps=False,
    )
    assert {r["variant"] for r in res["rows"]} == set(variants)
    assert {"gap", "ucR@1"} <= {r["metric"] for r in res["rows"] if r["split"] == "test"}
    assert {p["variant"] for p in res["paired"]} == set(variants) - {"contrastive"}
    md = (tmp_path / "s" / "results.md").read_text()
    for label in ("+ geometric consistency", "+ Brownian bridge", "+ feature separation", "C3 collapse", "+ SSPC (Multi-SK) + geometric"):
        assert label in md
    with pytest.raises(Exception, match="variants"):
        reproduce(out_dir=str(tmp_path / "x"), config=str(tmp_path / "c.yaml"), testbeds=("concepts",), variants=("mixup",), n_seeds=1)
