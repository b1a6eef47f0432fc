"""Evaluation (minidiff.metrics): the Frechet distance against closed forms, Gaussian fits, the feature
classifier (reproducible, cached, accurate) and sample_quality."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minidiff.metrics.classifier as classifier_module
from minidiff.data import load_dataset
from minidiff.metrics import (
    FeatureClassifier,
    features_and_probs,
    fid_from_features,
    frechet_distance,
    gaussian_fit,
    sample_quality,
    train_classifier,
)

pytestmark = pytest.mark.usefixtures("private_cache")  # never the classifier cache at home


def random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def psd_sqrt(s):
    """The symmetric square root of a symmetric PSD matrix, by eigendecomposition."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_oracle(mu1, s1, mu2, s2):
    """The Frechet distance by the symmetric form tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in NumPy only."""
    r1 = psd_sqrt(s1)
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)))


# -- frechet_distance ------------------------------------------------------------------------------


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(5), random_spd(rng, 5)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_shifted_mean_gives_the_squared_shift():
    rng = np.random.default_rng(1)
    mu, sigma, d = rng.standard_normal(4), random_spd(rng, 4), rng.standard_normal(4)
    assert frechet_distance(mu, sigma, mu + d, sigma) == pytest.approx(float(d @ d), rel=1e-9, abs=1e-9)


def test_one_dimensional_scaled_sigma():
    # N(0, 1) vs N(0, 4): (sd1 - sd2)^2 = (1 - 2)^2 = 1
    assert frechet_distance(0.0, 1.0, 0.0, 4.0) == pytest.approx(1.0, rel=1e-12)
    assert frechet_distance([0.0], [[1.0]], [0.0], [[4.0]]) == pytest.approx(1.0, rel=1e-12)
    # N(1, 9) vs N(-2, 1): 3^2 + (3 - 1)^2 = 13
    assert frechet_distance([1.0], [[9.0]], [-2.0], [[1.0]]) == pytest.approx(13.0, rel=1e-12)


@given(
    st.lists(
        st.tuples(
            st.floats(-3, 3),  # mean 1
            st.floats(-3, 3),  # mean 2
            st.floats(0.01, 10),  # variance 1
            st.floats(0.01, 10),  # variance 2
        ),
        min_size=1,
        max_size=6,
    )
)
def test_diagonal_covariances_match_the_closed_form(coords):
    m1, m2, v1, v2 = (np.array(c, dtype=np.float64) for c in zip(*coords))
    expected = float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))
    got = frechet_distance(m1, np.diag(v1), m2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_commuting_covariances_match_the_closed_form():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 5, 6), rng.uniform(0.1, 5, 6)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("d", [2, 5, 16])
def test_general_covariances_match_the_symmetric_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, scale=3.0)
    expected = frechet_oracle(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_symmetry_and_non_negativity_on_random_features(seed):
    rng = np.random.default_rng(seed)
    d = 3 + seed
    a = rng.standard_normal((200, d)) @ rng.standard_normal((d, d))
    b = 0.5 * rng.standard_normal((150, d)) + rng.standard_normal(d)
    ab, ba = fid_from_features(a, b), fid_from_features(b, a)
    assert ab == pytest.approx(ba, rel=1e-9, abs=1e-12)
    assert ab > 0
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(a, a) >= -1e-9
    expected = frechet_oracle(*gaussian_fit(a), *gaussian_fit(b))
    assert ab == pytest.approx(expected, rel=1e-8)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_singular_covariances_give_a_finite_distance():
    # fewer samples than dimensions: rank-deficient covariances (the offset path may be taken)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 12)), rng.standard_normal((6, 12)) + 1.0
    value = fid_from_features(a, b)
    assert np.isfinite(value) and value > 0
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-4)
    # a zero covariance is singular too: N(0, 0) vs N(0, diag(v)) is sum(v)
    zero = np.zeros((3, 3))
    v = np.array([1.0, 2.0, 3.0])
    assert frechet_distance(np.zeros(3), zero, np.zeros(3), np.diag(v)) == pytest.approx(6.0, abs=1e-5)


def test_shape_mismatches_are_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError):
        fid_from_features(np.zeros((10, 3)), np.ones((10, 4)))


def test_mean_and_covariance_of_different_sizes_are_an_error():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))


# -- gaussian_fit ----------------------------------------------------------------------------------


def test_gaussian_fit_is_the_mean_and_unbiased_covariance():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    mu, sigma = gaussian_fit(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    x64 = x.astype(np.float64)
    centered = x64 - x64.mean(axis=0)
    np.testing.assert_allclose(mu, x64.sum(axis=0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "shape",
    [(10,), (1, 4), (0, 4), (5, 2, 2), ()],
)
def test_gaussian_fit_errors(shape):
    with pytest.raises(ValueError, match="gaussian_fit"):
        gaussian_fit(np.zeros(shape))


def test_gaussian_fit_of_one_feature_is_a_1x1_covariance():
    _, sigma = gaussian_fit(np.arange(10.0).reshape(10, 1))
    assert sigma.shape == (1, 1)


# -- the classifier --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", image_size=8)


@pytest.fixture(scope="module")
def small(digits8):
    """240 digits at 8x8: enough for one quick epoch."""
    return digits8.images[:240], digits8.labels[:240]


def quick(images, labels, **kwargs):
    kwargs = {"epochs": 1, "batch_size": 32, **kwargs}
    return train_classifier(images, labels, 10, **kwargs)


def weights(model) -> dict:
    return {k: v.copy() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k


def test_train_classifier_is_reproducible(small):
    a = quick(*small, use_cache=False)
    b = quick(*small, use_cache=False)
    assert_same_weights(a, b)
    c = quick(*small, seed=1, use_cache=False)
    assert not np.array_equal(weights(a)["fc.weight"], weights(c)["fc.weight"])
    assert not a.training


class CountingAdam(classifier_module.Adam):
    created = 0

    def __init__(self, *args, **kwargs):
        type(self).created += 1
        super().__init__(*args, **kwargs)


def test_train_classifier_uses_the_cache(small, private_cache, monkeypatch):
    monkeypatch.setattr(classifier_module, "Adam", CountingAdam)
    CountingAdam.created = 0
    first = quick(*small)
    assert CountingAdam.created == 1
    files = sorted(p.name for p in private_cache.iterdir())
    assert len(files) == 1 and files[0].startswith("classifier-") and files[0].endswith(".safetensors")

    second = quick(*small)
    assert CountingAdam.created == 1  # loaded, not trained
    assert_same_weights(first, second)
    assert not second.training

    quick(*small, seed=1)  # another seed is another cache entry
    assert CountingAdam.created == 2
    assert len(list(private_cache.iterdir())) == 2

    quick(*small, use_cache=False)  # use_cache=False trains and writes nothing
    assert CountingAdam.created == 3
    assert len(list(private_cache.iterdir())) == 2
    assert not any(p.name.endswith(".tmp") for p in private_cache.iterdir())


def test_a_corrupt_cache_entry_is_retrained_and_replaced(small, private_cache):
    reference = quick(*small, use_cache=False)
    quick(*small)
    (entry,) = private_cache.iterdir()
    entry.write_bytes(b"not a safetensors file")
    again = quick(*small)
    assert_same_weights(again, reference)
    assert_same_weights(quick(*small), reference)  # the entry was rewritten and loads


def test_the_cache_key_covers_the_learning_rate(small):
    quick(*small, lr=2e-3)
    cached = quick(*small, lr=2e-2)
    fresh = quick(*small, lr=2e-2, use_cache=False)
    assert_same_weights(cached, fresh)


def test_fewer_images_than_a_batch_still_trains_or_fails_loudly(small):
    images, labels = small[0][:40], small[1][:40]
    try:
        model = train_classifier(images, labels, 10, epochs=1, batch_size=64, use_cache=False)
    except ValueError:
        return
    untrained = FeatureClassifier(1, 8, 10, seed=0)
    assert not np.array_equal(weights(model)["fc.weight"], weights(untrained)["fc.weight"])


@pytest.mark.parametrize(
    "images_shape, labels_shape",
    [((10, 8, 8), (10,)), ((10, 1, 8, 8), (9,)), ((10, 1, 6, 6), (10,)), ((10, 1, 8, 12), (10,))],
)
def test_train_classifier_rejects_bad_shapes(images_shape, labels_shape):
    with pytest.raises(ValueError, match="train_classifier"):
        train_classifier(np.zeros(images_shape), np.zeros(labels_shape, dtype=int), 10, epochs=1)


@pytest.fixture(scope="module")
def trained(digits8):
    train, held_out = digits8.split(0.25, seed=0)
    model = train_classifier(train.images, train.labels, 10, epochs=4, use_cache=False)
    return model, held_out


def test_the_classifier_recognises_held_out_digits(trained):
    model, held_out = trained
    feats, probs = features_and_probs(model, held_out.images)
    accuracy = float((probs.argmax(axis=1) == held_out.labels).mean())
    assert accuracy > 0.7, accuracy  # chance is 0.1


def test_features_and_probs(trained):
    model, held_out = trained
    images = held_out.images[:40]
    feats, probs = features_and_probs(model, images)
    assert feats.shape == (40, 64) and probs.shape == (40, 10)
    assert feats.dtype == np.float64 and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert (probs >= 0).all()
    f7, p7 = features_and_probs(model, images, batch_size=7)  # batching does not change the answer
    np.testing.assert_allclose(f7, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p7, probs, rtol=1e-5, atol=1e-6)
    assert isinstance(model, FeatureClassifier)


def test_sample_quality(trained, digits8):
    model, held_out = trained
    samples = held_out.images[:60]
    quality = sample_quality(model, samples, held_out.images)
    assert set(quality) == {"fid", "mean_confidence", "class_histogram"}
    hist = quality["class_histogram"]
    assert isinstance(hist, list) and len(hist) == 10 and sum(hist) == 60
    _, probs = features_and_probs(model, samples)
    assert hist == np.bincount(probs.argmax(axis=1), minlength=10).tolist()
    assert 0.1 <= quality["mean_confidence"] <= 1.0
    assert quality["fid"] == pytest.approx(
        fid_from_features(
            features_and_probs(model, samples)[0], features_and_probs(model, held_out.images)[0]
        )
    )
    assert quality["fid"] > 0

    same = sample_quality(model, held_out.images, held_out.images)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    noise = np.random.default_rng(0).uniform(-1, 1, samples.shape).astype(np.float32)
    assert sample_quality(model, noise, held_out.images)["fid"] > quality["fid"]
    # a histogram counts every class even when one dominates
    assert len(sample_quality(model, samples[:3], held_out.images)["class_histogram"]) == 10
