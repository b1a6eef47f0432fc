"""FID as the field reports it: KID against its definition written out, the low-rank Frechet
distance against the covariance form, and ``minidiff eval --metric fid --inception FILE`` on a tiny
run with a random-weight Inception file written by torch.save (its reference features cached)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tiny_runs import tiny_run

import minidiff.metrics.fid as fid_module
import minidiff.models.inception as inception_module
import minidiff.train.evaluate as evaluate
from minidiff.cli import main
from minidiff.metrics import fid_from_features, frechet_distance, gaussian_fit, kernel_inception_distance
from minidiff.models.inception import InceptionV3

# -- KID --------------------------------------------------------------------------------------------


def kid_oracle(x, y):
    """The unbiased MMD^2 of k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((7, 5)) + 0.3
    # one subset of every feature: a permutation, which the estimate does not depend on
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=7)
    assert mean == pytest.approx(kid_oracle(x, y), rel=1e-12)
    assert std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    same, same_std = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3  # unbiased: zero in expectation, either sign
    assert shifted > 10 * abs(same)


def test_kid_rejects_mismatched_features():
    with pytest.raises(ValueError, match=r"kernel_inception_distance: need features \(N, D\) and \(M, D\)"):
        kernel_inception_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"need at least 2 features per set, got 1, 4"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((4, 3)))


# -- the Frechet distance with fewer features than dimensions ---------------------------------------


@pytest.mark.parametrize("n, m", [(5, 9), (12, 4), (30, 30)])
def test_low_rank_frechet_distance_equals_the_covariance_form(n, m):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, 40)) @ rng.standard_normal((40, 40))
    b = rng.standard_normal((m, 40)) + 0.2
    expected = frechet_distance(*gaussian_fit(a), *gaussian_fit(b))  # scipy's sqrtm of S_a S_b
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


# -- minidiff eval --metric fid --inception -----------------------------------------------------------

TINY = tiny_run(steps=2, model={"attn_resolutions": []})
pytestmark = pytest.mark.usefixtures("private_cache")  # every test: a cache of its own


@pytest.fixture(autouse=True)
def small_inception_input(monkeypatch):
    """The command's plumbing runs the network at 75x75, its smallest input, not 299x299 (16
    times the work); tests/models/test_inception.py checks the network at 299."""
    monkeypatch.setattr(inception_module, "FID_SIZE", 75)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fid-run")
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY))
    assert main(["train", "--config", str(config), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weight FID Inception network saved as PyTorch saves a state dict."""
    rng = np.random.default_rng(0)
    state = InceptionV3(rng=rng).state_dict()
    for name, w in state.items():
        if name.endswith("conv.weight"):  # He-scaled: features of order 1, not vanishing ones
            state[name] = (rng.standard_normal(w.shape) * np.sqrt(2 / w[0].size)).astype(w.dtype)
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


def test_eval_fid_with_inception(run, weights, capsys, monkeypatch, private_cache):
    calls = []
    real = evaluate.inception_features

    def counting(network, images, **kwargs):
        calls.append(len(images))
        return real(network, images, **kwargs)

    monkeypatch.setattr(evaluate, "inception_features", counting)
    args = ["eval", "--checkpoint", str(run), "--metric", "fid", "--inception", str(weights)]
    args += ["--num", "3", "--reference", "4", "--steps", "2"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("FID-3 (Inception pool3 features, random_inception.pth) ")
    assert lines[0].endswith("of 3 samples against 4 training images")
    fid = float(re.search(r"\) (-?\d+\.\d+) of", lines[0]).group(1))
    assert np.isfinite(fid) and fid > 0
    assert lines[1].startswith("KID ") and "(the same features)" in lines[1]
    assert lines[2].startswith("warning: ") and "not the standard pytorch-fid weights" in lines[2]
    assert calls == [3, 4]
    assert len(list(private_cache.glob("inception-features-*.npy"))) == 1

    # a second evaluation reads the reference features from the cache: only the samples run
    assert main(args) == 0
    assert calls == [3, 4, 3]
    assert capsys.readouterr().out.strip().splitlines()[0] == lines[0]  # same seed, same numbers


def test_inception_report_fields(run, weights):
    r = evaluate.inception_report(run, weights, num=3, reference_num=4, steps=2)
    assert (r["num_samples"], r["num_reference"], r["ddim_steps"]) == (3, 4, 2)
    assert r["weights_sha256"] == fid_module.file_sha256(weights) and not r["standard_weights"]
    assert r["fid"] > 0 and r["kid_std"] >= 0 and np.isfinite(r["kid"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metric", "fid", "--inception", "missing.pth"], "--inception missing.pth: no such file"),
        (["--metric", "fid", "--reference", "5"], "--reference applies with --inception only"),
        (["--metric", "bpd", "--inception", "x.pth"], "--inception applies to --metric fid only"),
    ],
)
def test_eval_fid_argument_errors(run, extra, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["eval", "--checkpoint", str(run), *extra])


def test_eval_num_defaults(run, monkeypatch, capsys):
    """FID-10k with the Inception weights, as the field monitors training; 500 otherwise. The
    reports are stubbed: only the sample counts the command asks for are under test."""
    seen = {}
    numbers = {"fid": 1.0, "kid": 0.1, "kid_std": 0.01}

    def inception(checkpoint, weights, num, **kwargs):
        seen["inception"] = num
        return numbers | {
            "num_reference": 9,
            "weights": weights,
            "weights_sha256": "0" * 64,
            "standard_weights": False,
        }

    def classifier(checkpoint, num, **kwargs):
        seen["classifier"] = num
        return numbers | {"real_fid": 0.5, "mean_confidence": 0.9, "class_histogram": [num]}

    monkeypatch.setattr(evaluate, "inception_report", inception)
    monkeypatch.setattr(evaluate, "sample_quality_report", classifier)
    for extra in (["--inception", __file__], []):
        assert main(["eval", "--checkpoint", str(run), "--metric", "fid", "--steps", "10", *extra]) == 0
    assert seen == {"inception": 10_000, "classifier": 500}
    out = capsys.readouterr().out
    assert "FID-10k (Inception pool3 features, test_fid.py) 1.000 of 10000 samples" in out
    assert "pass --inception pt_inception-2015-12-05-6726825d.pth" in out  # the fallback says what it is
