"""Frechet distance between Gaussian fits of two feature sets, and the kernel inception distance.

FID(a, b) = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

Two feature extractors feed it. The FID papers report uses the FID Inception network
(:class:`minidiff.models.inception.InceptionV3`) with pytorch-fid's weights file, loaded by
``load_inception(path)``; ``inception_features`` runs it on images the way pytorch-fid does (8-bit
images, resized to 299). Without that file, minidiff's own small classifier
(:mod:`minidiff.metrics.classifier`) gives features whose distances compare minidiff models with
each other on one dataset, and are not comparable with published FIDs.

KID (Binkowski et al., 2018) is the unbiased estimate of the squared maximum mean discrepancy
under the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets: unlike FID it has no
bias that depends on the sample size, so it compares runs of different sizes.
"""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
from scipy import linalg

from ..autograd import no_grad
from ..data.images import to_uint8
from ..io.torch_file import load_torch_file
from ..models.inception import InceptionV3
from ..tensor import Tensor

# pytorch-fid's port of TensorFlow's FID Inception graph; torch hub names files by their sha256
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_SHA256_PREFIX = "6726825d"


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"gaussian_fit: need features of shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes differ: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}"
        )
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # a singular product: nudge both covariances, as is usual for FID
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real  # sqrtm may return tiny imaginary parts from round-off
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features_a, features_b) -> float:
    """The Frechet distance between the Gaussian fits of features (N, D) and (M, D).

    With fewer features than dimensions (a quick FID on 2048-d Inception features) the D x D
    matrix square root is never formed: with A and B the centred features, S_a = A^T A / (N-1)
    and S_b = B^T B / (M-1), the nonzero eigenvalues of S_a S_b are those of (A B^T)(A B^T)^T
    / ((N-1)(M-1)), so tr (S_a S_b)^(1/2) is the sum of the singular values of the N x M matrix
    A B^T over sqrt((N-1)(M-1)): exact, and an SVD of N x M instead of a D x D sqrtm."""
    a, b = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    for f in (a, b):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"fid_from_features: need features of shape (N >= 2, D), got {f.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fid_from_features: features of {a.shape[1]} and {b.shape[1]} dims")
    (n, d), m = a.shape, b.shape[0]
    if min(n, m) > d:
        return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca, cb = a - mu_a, b - mu_b
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    diff = mu_a - mu_b
    return float(diff @ diff + (ca * ca).sum() / (n - 1) + (cb * cb).sum() / (m - 1) - 2 * cross)


def kernel_inception_distance(features_a, features_b, num_subsets=100, subset_size=1000, seed=0):
    """KID: the unbiased squared MMD of the cubic polynomial kernel, over ``num_subsets`` random
    subsets of ``subset_size`` features from each set (fewer when a set is smaller). Returns the
    mean and the standard deviation over the subsets."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"kernel_inception_distance: need features (N, D) and (M, D), got {a.shape}, {b.shape}"
        )
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(
            f"kernel_inception_distance: need at least 2 features per set, got {len(a)}, {len(b)}"
        )
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        # the diagonals k(x_i, x_i) are left out of the within-set means: that makes it unbiased
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within - 2 * k_xy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_inception(path, dtype=None) -> InceptionV3:
    """The FID Inception network with the weights of a ``.pth`` file (pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth``, read without torch). BatchNorm's
    ``num_batches_tracked`` counters are dropped; any other missing, unexpected or mis-shaped key
    fails, naming the file and the keys."""
    path = pathlib.Path(path)
    state = {k: v for k, v in load_torch_file(path).items() if not k.endswith(".num_batches_tracked")}
    model = InceptionV3(dtype=dtype, init=False)  # every weight is loaded, or the load fails
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"{path}: not the FID Inception weights ({INCEPTION_FILE} from {INCEPTION_URL}): {e}"
        ) from None
    return model.eval()


def inception_features(model: InceptionV3, images, batch_size=50, quantize=True) -> np.ndarray:
    """Pool3 features (N, 2048), float64, of images (N, C, H, W) in [-1, 1] (grayscale repeated to
    three channels). ``quantize`` first rounds them to 8 bits, as the PNG files pytorch-fid reads
    hold them; each batch is then resized to 299x299 inside the network."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"inception_features: images must have shape (N, 1 or 3, H, W), got {images.shape}")
    weight = model.Conv2d_1a_3x3.conv.weight  # the batches go to the model's dtype and device
    feats = []
    with no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if quantize:
                batch = to_uint8(batch).astype(np.float64) / 127.5 - 1
            if batch.shape[1] == 1:
                batch = np.repeat(batch, 3, axis=1)
            x = Tensor(np.ascontiguousarray(batch), dtype=weight.dtype, device=weight.device)
            feats.append(model.features(x).numpy().astype(np.float64))
    return np.concatenate(feats)
