"""Fréchet distance, Inception Score and precision/recall against closed forms and direct implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from uvit_cli.errors import UvitError
from uvit_cli.metrics import frechet
from uvit_cli.metrics.frechet import GaussianAccumulator, GaussianStats, frechet_distance, trace_sqrt_product
from uvit_cli.metrics.inception_score import InceptionScoreAccumulator, inception_score
from uvit_cli.metrics.kid import kernel_inception_distance
from uvit_cli.metrics.precision_recall import manifold_radii, precision_recall


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


# ---------------------------------------------------------------- Fréchet distance

def test_frechet_univariate_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.5], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(2.0 ** 2 + 1.5 ** 2, rel=1e-12)


def test_frechet_commuting_covariances_closed_form():
    d = 16
    rng = np.random.default_rng(0)
    q = _rotation(d, 1)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_non_commuting_2x2_closed_form():
    # For a 2x2 M with positive eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    m = s1 @ s2
    tr_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert frechet_distance([0, 0], s1, [0, 0], s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance([0, 0], s1, [0, 0], s2, method="eigh") == pytest.approx(expected, rel=1e-10)


def test_frechet_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 32)) * 3 + 1
    st = GaussianStats.from_features(x)
    assert abs(frechet_distance(st.mu, st.sigma, st.mu, st.sigma)) < 1e-8 * np.trace(st.sigma)


def test_sqrtm_and_eigh_forms_agree_on_random_covariances():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((400, 64)), rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64)) * 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s1, s2, method="eigh"), rel=1e-10)


def test_frechet_eps_retry_adds_eps_to_both_diagonals(monkeypatch):
    calls = []
    real = frechet._sqrtm

    def fake(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(frechet, "_sqrtm", fake)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 0.0])
    frechet_distance([0, 0], s1, [0, 0], s2)
    eye = np.eye(2) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye), rtol=0, atol=1e-15)


def test_frechet_imaginary_component_check(monkeypatch):
    s = np.eye(2)
    monkeypatch.setattr(frechet, "_sqrtm", lambda a: np.eye(2) + 1e-5j * np.ones((2, 2)))
    assert frechet_distance([0, 0], s, [0, 0], s) == pytest.approx(0.0, abs=1e-12)  # tiny imag: real part kept
    monkeypatch.setattr(frechet, "_sqrtm", lambda a: np.eye(2) + 0.1j * np.eye(2))
    with pytest.raises(UvitError, match="imaginary component"):
        frechet_distance([0, 0], s, [0, 0], s)


def test_gaussian_accumulator_matches_numpy_over_batches():
    x = np.random.default_rng(0).standard_normal((1003, 24)).astype(np.float32) * 0.5 + 1e3  # large offset
    acc = GaussianAccumulator()
    for i in range(0, len(x), 97):
        acc.update(x[i:i + 97])
    st = acc.result()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(st.mu, x64.mean(0), rtol=1e-13)
    np.testing.assert_allclose(st.sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-12)
    assert st.n == 1003


def test_frechet_dimension_mismatch_is_a_clear_error():
    with pytest.raises(UvitError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- Inception Score

def test_is_uniform_predictions_is_one():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_is_confident_balanced_predictions_equals_class_count():
    k = 10
    logits = np.zeros((1000, 1008))
    logits[np.arange(1000), np.arange(1000) % k] = 200.0
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)


def test_is_two_class_soft_predictions_closed_form():
    a = 0.8
    p = np.array([[a, 1 - a], [1 - a, a]] * 50)
    expected = np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a)))
    assert inception_score(np.log(p)) == pytest.approx(expected, rel=1e-12)


def test_is_uses_consecutive_splits_of_5000():
    # First 5000 samples: 4 classes (IS 4); next 5000: 8 other classes (IS 8). ADM splits -> mean(4, 8) = 6.
    logits = np.zeros((10000, 16))
    logits[np.arange(5000), np.arange(5000) % 4] = 200
    logits[5000 + np.arange(5000), 4 + np.arange(5000) % 8] = 200
    assert inception_score(logits) == pytest.approx(6.0, rel=1e-9)
    # One split of 10000: p(y) = 1/8 on the first 4 classes, 1/16 on the next 8 -> sqrt(8 * 16).
    assert inception_score(logits, split_size=10000) == pytest.approx(np.sqrt(128), rel=1e-9)


def test_is_streaming_equals_one_shot():
    logits = np.random.default_rng(0).standard_normal((12000, 1008)) * 3
    acc = InceptionScoreAccumulator()
    for i in range(0, len(logits), 777):  # batches straddle split boundaries
        acc.update(logits[i:i + 777])
    mean, std = acc.result()
    assert mean == pytest.approx(inception_score(logits), rel=1e-12)
    # Direct ADM formula on the three splits (5000, 5000, 2000).
    scores = []
    for s in range(0, 12000, 5000):
        part = logits[s:s + 5000]
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = p * (np.log(p) - np.log(p.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


# ---------------------------------------------------------------- precision / recall

def _direct_precision_recall(real, fake, k=3):
    """Kynkäänniemi et al. 2019 as written: k-NN radius of each point among the *other* points of its set."""
    def radii(x):
        d = cdist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d = cdist(real, fake)
    r_real, r_fake = radii(real), radii(fake)
    precision = np.mean([(d[:, j] <= r_real).any() for j in range(len(fake))])
    recall = np.mean([(d[i, :] <= r_fake).any() for i in range(len(real))])
    return precision, recall


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.7, 1.3), (2.0, 0.5)])
def test_precision_recall_equals_the_definition(shift, scale):
    rng = np.random.default_rng(int(shift * 10))
    real = rng.standard_normal((300, 12))
    fake = rng.standard_normal((257, 12)) * scale + shift
    p, r = precision_recall(real.astype(np.float32), fake.astype(np.float32))
    ep, er = _direct_precision_recall(real.astype(np.float32).astype(np.float64),
                                      fake.astype(np.float32).astype(np.float64))
    assert (p, r) == pytest.approx((ep, er), abs=1.5 / 257)  # at most one boundary flip from float32 rounding
    assert 0 <= p <= 1 and 0 <= r <= 1


def test_precision_recall_blockwise_equals_single_block():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((230, 8)), rng.standard_normal((190, 8)) + 0.4
    assert precision_recall(real, fake, block=64) == precision_recall(real, fake, block=10000)
    np.testing.assert_array_equal(manifold_radii(real, block=50).numpy(), manifold_radii(real, block=1000).numpy())


def test_precision_recall_extremes_and_too_few_points():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((100, 4))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    with pytest.raises(UvitError, match="more than 3"):
        precision_recall(real, real[:3])


# ---------------------------------------------------------------- KID

def _kid_features(seed, n=60, m=50, d=32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((m, d)) * 1.2 + 0.3


def test_kid_equals_clean_fid_with_the_same_subsets():
    """clean-fid draws its subsets from numpy's global generator: seeding it as ours is seeded gives the same
    subsets, so the values agree to rounding."""
    from cleanfid.fid import kernel_distance

    samples, ref = _kid_features(0)
    for seed, subsets, size in ((0, 100, 1000), (7, 20, 30)):
        ours = kernel_inception_distance(samples, ref, num_subsets=subsets, max_subset_size=size, seed=seed)
        np.random.seed(seed)
        theirs = kernel_distance(samples, ref, num_subsets=subsets, max_subset_size=size)
        assert ours["kid"] == pytest.approx(theirs, rel=1e-6)
        assert ours["kid_subsets"] == subsets and ours["kid_subset_size"] == min(size, 50)


def test_kid_with_whole_sets_as_subsets_is_the_unbiased_mmd():
    """Subsets of the whole sets are permutations: the value is fixed, whatever the generator, and equals the
    unbiased MMD^2 written out."""
    from cleanfid.fid import kernel_distance

    samples, ref = _kid_features(1, n=40, m=40, d=8)
    d = samples.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    m = 40
    direct = ((k(samples, samples).sum() - np.trace(k(samples, samples))) / (m * (m - 1))
              + (k(ref, ref).sum() - np.trace(k(ref, ref))) / (m * (m - 1)) - 2 * k(samples, ref).mean())
    ours = kernel_inception_distance(samples, ref, num_subsets=3, seed=5)
    assert ours["kid"] == pytest.approx(direct, rel=1e-9) and ours["kid_std"] == pytest.approx(0, abs=1e-9)
    assert kernel_distance(samples, ref, num_subsets=3) == pytest.approx(direct, rel=1e-6)


def test_kid_separates_sets_and_refuses_tiny_ones():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((200, 16)), rng.standard_normal((200, 16))
    same = kernel_inception_distance(a, b, num_subsets=20)["kid"]
    shifted = kernel_inception_distance(a + 1.0, b, num_subsets=20)["kid"]
    assert abs(same) < 0.05 < shifted
    with pytest.raises(UvitError, match="at least 2"):
        kernel_inception_distance(a[:1], b)
