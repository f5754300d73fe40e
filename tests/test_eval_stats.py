"""Evaluation statistics (fvlm.eval.stats): the paired difference clustered by video, and benchmark
accuracy intervals that resample whole videos when questions share one."""

import numpy as np
import pytest

from fvlm.eval.scoring import accuracy_summary, wilson_interval
from fvlm.eval.stats import N_BOOT, clustered_accuracy_interval, paired_difference


def test_the_default_resample_count_leaves_50_draws_in_each_tail():
    assert N_BOOT >= 2000
    assert paired_difference.__kwdefaults__["n_boot"] == N_BOOT


def test_clusters_of_one_item_each_give_exactly_the_unclustered_result():
    rng = np.random.default_rng(0)
    a, b, w = rng.normal(size=90), rng.normal(size=90), rng.integers(1, 5, 90)
    plain = paired_difference(a, b, w, n_boot=700, seed=2)
    singletons = paired_difference(a, b, w, clusters=[f"v{i}" for i in range(90)], n_boot=700, seed=2)
    assert plain == singletons and plain["n_clusters"] == 90


def _shared_videos(n_videos=150, per_video=3, seed=0):
    """Questions of one video are answered alike (the model read the video or it did not)."""
    rng = np.random.default_rng(seed)
    read = rng.random(n_videos) < 0.6
    correct = np.repeat(read, per_video).astype(int)
    videos = np.repeat([f"video{i}" for i in range(n_videos)], per_video)
    return correct, list(videos)


def test_clustered_interval_widens_by_the_cluster_size_and_agrees_with_the_analytic_one():
    correct, videos = _shared_videos()
    zeros = np.zeros(len(correct))
    naive = paired_difference(correct, zeros, n_boot=4000, seed=1)
    clustered = paired_difference(correct, zeros, clusters=videos, n_boot=4000, seed=1)
    assert clustered["diff"] == naive["diff"] == correct.mean() and clustered["n_clusters"] == 150
    # Perfectly correlated triples: the standard error is sqrt(3) times the independent one.
    assert clustered["se"] / naive["se"] == pytest.approx(np.sqrt(3), rel=0.01)
    width = clustered["ci95"][1] - clustered["ci95"][0]
    assert np.allclose(clustered["ci95"], clustered["ci95_bootstrap"], atol=0.1 * width), clustered
    boot_width = clustered["ci95_bootstrap"][1] - clustered["ci95_bootstrap"][0]
    naive_width = naive["ci95_bootstrap"][1] - naive["ci95_bootstrap"][0]
    assert boot_width / naive_width == pytest.approx(np.sqrt(3), rel=0.15)


def test_accuracy_interval_is_wilson_unless_questions_share_a_video():
    correct, videos = _shared_videos()
    options = [4] * len(correct)
    alone = accuracy_summary(list(correct), options, [f"q{i}" for i in range(len(correct))])
    assert alone["ci95_method"] == "wilson"
    assert alone["ci95"] == alone["ci95_wilson"] == list(wilson_interval(int(correct.sum()), len(correct)))
    shared = accuracy_summary(list(correct), options, videos)
    assert shared["ci95_method"] == "bootstrap over 150 videos" and shared["ci95_wilson"] == alone["ci95"]
    assert shared["ci95"] == clustered_accuracy_interval(correct, videos)
    assert shared["ci95"][0] < shared["accuracy"] < shared["ci95"][1]
    assert (shared["ci95"][1] - shared["ci95"][0]) > 1.4 * (alone["ci95"][1] - alone["ci95"][0])
    # One video: nothing is known about how accuracy varies between videos.
    assert accuracy_summary([1, 1, 0], [3, 3, 3], ["v", "v", "v"])["ci95"] == [0.0, 1.0]


def test_every_report_interval_defaults_to_at_least_2000_resamples():
    import inspect

    from fvlm.analysis import compare, scaling
    from fvlm.analysis.cli import analyze
    from fvlm.cli import build_parser
    from fvlm.experiments.evidence import EvidenceSettings
    from fvlm.experiments.presets import PAPER, TINY

    args = build_parser().parse_args(["analyze", "somewhere", "--out", "o"])
    assert args.bootstrap >= 2000
    for function in (analyze, scaling.scaling_fits, compare.compare_cells):
        assert inspect.signature(function).parameters["n_boot"].default >= 2000, function
    assert PAPER.analysis_bootstrap >= 2000 and TINY.analysis_bootstrap >= 2000
    assert EvidenceSettings().n_boot >= 2000


def test_analyze_refuses_a_resample_count_below_one(tmp_path, capsys):
    from fvlm.cli import main

    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bootstrap" in err[0]
