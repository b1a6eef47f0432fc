"""The FID Inception network against an independent PyTorch implementation with random weights,
saved with torch.save and read back through minidiff's .pth reader (both torch.save formats);
pool3 features within 1e-4 relative. The network is compared at 107x107 without the resize (the
smallest input whose last block is 2x2, so that its max pool differs from an average; 75x75
leaves it 1x1), and once at 299x299 through the bilinear resize, batch 1."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as TF

import minidiff as md
import minidiff.models.inception as inception_module
from minidiff.io.torch_file import TorchFileError, load_torch_file
from minidiff.metrics.fid import inception_features, load_inception
from minidiff.models.inception import InceptionV3

REL = 1e-4


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- the oracle: the network as a table of branches, run by torch.nn layers --------------------------
# A branch is a list of steps: a convolution (name, in, out, kernel, stride, padding), "avg"
# (3x3 average without the padding), "max1" (3x3 max, stride 1, padding 1), "max2" (3x3 max,
# stride 2), or ("fork", conv_a, conv_b): two convolutions of the same input, concatenated.


def conv(name, cin, cout, k, s=1, p=0):
    return (name, cin, cout, k, s, p)


def block_a(cin, pool):
    return [
        [conv("branch1x1", cin, 64, 1)],
        [conv("branch5x5_1", cin, 48, 1), conv("branch5x5_2", 48, 64, 5, p=2)],
        [
            conv("branch3x3dbl_1", cin, 64, 1),
            conv("branch3x3dbl_2", 64, 96, 3, p=1),
            conv("branch3x3dbl_3", 96, 96, 3, p=1),
        ],
        ["avg", conv("branch_pool", cin, pool, 1)],
    ]


def block_b(cin):
    return [
        [conv("branch3x3", cin, 384, 3, s=2)],
        [
            conv("branch3x3dbl_1", cin, 64, 1),
            conv("branch3x3dbl_2", 64, 96, 3, p=1),
            conv("branch3x3dbl_3", 96, 96, 3, s=2),
        ],
        ["max2"],
    ]


def block_c(cin, c7):
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    return [
        [conv("branch1x1", cin, 192, 1)],
        [
            conv("branch7x7_1", cin, c7, 1),
            conv("branch7x7_2", c7, c7, row[0], p=row[1]),
            conv("branch7x7_3", c7, 192, col[0], p=col[1]),
        ],
        [conv("branch7x7dbl_1", cin, c7, 1)]
        + [conv(f"branch7x7dbl_{i}", c7, c7, k, p=p) for i, (k, p) in [(2, col), (3, row), (4, col)]]
        + [conv("branch7x7dbl_5", c7, 192, row[0], p=row[1])],
        ["avg", conv("branch_pool", cin, 192, 1)],
    ]


def block_d(cin):
    return [
        [conv("branch3x3_1", cin, 192, 1), conv("branch3x3_2", 192, 320, 3, s=2)],
        [
            conv("branch7x7x3_1", cin, 192, 1),
            conv("branch7x7x3_2", 192, 192, (1, 7), p=(0, 3)),
            conv("branch7x7x3_3", 192, 192, (7, 1), p=(3, 0)),
            conv("branch7x7x3_4", 192, 192, 3, s=2),
        ],
        ["max2"],
    ]


def block_e(cin, pool):
    halves = lambda prefix: (
        "fork",
        conv(f"{prefix}a", 384, 384, (1, 3), p=(0, 1)),
        conv(f"{prefix}b", 384, 384, (3, 1), p=(1, 0)),
    )  # noqa: E731
    return [
        [conv("branch1x1", cin, 320, 1)],
        [conv("branch3x3_1", cin, 384, 1), halves("branch3x3_2")],
        [
            conv("branch3x3dbl_1", cin, 448, 1),
            conv("branch3x3dbl_2", 448, 384, 3, p=1),
            halves("branch3x3dbl_3"),
        ],
        [pool, conv("branch_pool", cin, 192, 1)],
    ]


STEM = [
    conv("Conv2d_1a_3x3", 3, 32, 3, s=2),
    conv("Conv2d_2a_3x3", 32, 32, 3),
    conv("Conv2d_2b_3x3", 32, 64, 3, p=1),
    "max2",
    conv("Conv2d_3b_1x1", 64, 80, 1),
    conv("Conv2d_4a_3x3", 80, 192, 3),
    "max2",
]
BLOCKS = [
    ("Mixed_5b", block_a(192, 32)),
    ("Mixed_5c", block_a(256, 64)),
    ("Mixed_5d", block_a(288, 64)),
    ("Mixed_6a", block_b(288)),
    ("Mixed_6b", block_c(768, 128)),
    ("Mixed_6c", block_c(768, 160)),
    ("Mixed_6d", block_c(768, 160)),
    ("Mixed_6e", block_c(768, 192)),
    ("Mixed_7a", block_d(768)),
    ("Mixed_7b", block_e(1280, "avg")),
    ("Mixed_7c", block_e(2048, "max1")),  # the FID graph's max pool in the last block
]


class TorchBasicConv(nn.Module):
    def __init__(self, cin, cout, k, s, p):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return TF.relu(self.bn(self.conv(x)))


class TorchSteps(nn.Module):
    """Runs a list of steps; the convolutions are registered under their names."""

    def __init__(self, steps, parent):
        super().__init__()
        self.steps = steps
        for step in steps:
            for c in step[1:] if isinstance(step, tuple) and step[0] == "fork" else [step]:
                if isinstance(c, tuple):
                    parent.add_module(c[0], TorchBasicConv(*c[1:]))
        self.parent = [parent]  # not a submodule: the names live on the parent

    def forward(self, x):
        mods = dict(self.parent[0].named_children())
        for step in self.steps:
            if step == "avg":
                x = TF.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            elif step == "max1":
                x = TF.max_pool2d(x, 3, stride=1, padding=1)
            elif step == "max2":
                x = TF.max_pool2d(x, 3, stride=2)
            elif step[0] == "fork":
                x = torch.cat([mods[step[1][0]](x), mods[step[2][0]](x)], 1)
            else:
                x = mods[step[0]](x)
        return x


class TorchBlock(nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.branches = [TorchSteps(b, self) for b in branches]

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid's InceptionV3(use_fid_inception=True): images in [0, 1] -> pool3 features."""

    def __init__(self):
        super().__init__()
        self.stem = [TorchSteps(STEM, self)]
        for name, branches in BLOCKS:
            self.add_module(name, TorchBlock(branches))
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x, resize=True):
        if resize:
            x = TF.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.stem[0](x)
        for name, _ in BLOCKS:
            x = getattr(self, name)(x)
        return TF.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


@pytest.fixture(scope="module")
def oracle():
    torch.manual_seed(0)
    net = TorchFIDInception().eval()
    with torch.no_grad():
        # He-scaled weights and batch norms near the identity keep the activations of order 1
        # through all 94 convolutions, so the comparison is of values, not of vanishing noise
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def weights_file(oracle, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(oracle.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(weights_file):
    return load_inception(weights_file)


def test_the_oracle_has_the_weight_files_keys(oracle, model):
    """The state dict holds torchvision's names, num_batches_tracked included (which minidiff drops)."""
    keys = set(oracle.state_dict())
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in keys and "fc.bias" in keys
    assert {k for k in keys if not k.endswith("num_batches_tracked")} == set(dict(model.named_parameters()))


def test_parameter_count_matches_pytorch_fid(oracle, model):
    """torchvision's InceptionV3 has 27,161,264 weights; without the auxiliary classifier
    (3,326,696) and with 1008 classes instead of 1000 (+8 x 2049) that is 23,850,960, the
    trainable weights of pytorch-fid's network. minidiff also counts the batch norms' running
    statistics, which it keeps as parameters."""
    running = sum(p.size for name, p in model.named_parameters() if "running_" in name)
    assert model.num_parameters() - running == 23_850_960 == sum(p.numel() for p in oracle.parameters())


def test_features_at_107_match_pytorch(oracle, model):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 107, 107)).astype(np.float32)
    ours = model.features(md.tensor(x), resize=False).numpy()
    with torch.no_grad():
        theirs = oracle(torch.from_numpy((x + 1) / 2), resize=False).numpy()
    assert ours.shape == (2, 2048) and ours.dtype == np.float32
    assert rel_error(ours, theirs) < REL


def test_features_at_299_through_the_resize_match_pytorch(oracle, model):
    """A 32x32 image resized to 299 (pytorch-fid resizes in [0, 1], minidiff in [-1, 1]: the same
    line through the same interpolation weights)."""
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    ours = model.features(md.tensor(x)).numpy()
    with torch.no_grad():
        theirs = oracle(torch.from_numpy((x + 1) / 2)).numpy()
    assert rel_error(ours, theirs) < REL


def test_inception_features_quantizes_and_repeats_gray(model, monkeypatch):
    """Gray images are the three-channel image with equal channels; quantize rounds to 8 bits.
    (Resized to 75x75 here: the batching, not the network, is under test.)"""
    monkeypatch.setattr(inception_module, "FID_SIZE", 75)
    rng = np.random.default_rng(2)
    gray = rng.uniform(-1, 1, (1, 1, 75, 75))
    step = np.rint((gray + 1) * 127.5) / 127.5 - 1
    rgb = np.repeat(step, 3, axis=1).astype(np.float32)
    expected = model.features(md.tensor(rgb)).numpy()
    got = inception_features(model, gray)
    assert got.dtype == np.float64 and got.shape == (1, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


# -- the .pth reader on real torch files -------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_file_reads_what_torch_save_wrote(tmp_path, zip_format):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    state = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(5),
        "flag": torch.tensor([True, False]),
        "transposed": base.t(),  # strides (1, 6): copied out in its logical order
        "slice": base[1:, 2:4],  # a view at an offset into a shared storage
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": nn.Parameter(torch.ones(2)),
    }
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_torch_file(path)
    assert set(loaded) == set(state)
    for name, t in state.items():
        expected = t.detach().numpy()
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].shape == expected.shape, name
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)


def test_both_formats_of_the_network_file_read_the_same(oracle, weights_file, tmp_path):
    """pytorch-fid's weights predate PyTorch 1.6's zip format: the whole state dict (an
    OrderedDict with its _metadata) written the old way reads to the same arrays."""
    legacy = tmp_path / "legacy.pth"
    torch.save(oracle.state_dict(), legacy, _use_new_zipfile_serialization=False)
    zipped, old = load_torch_file(weights_file), load_torch_file(legacy)
    assert list(zipped) == list(old) == list(oracle.state_dict())
    for name, value in zipped.items():
        np.testing.assert_array_equal(old[name], value, err_msg=name)


def test_torch_file_refuses_other_pickles(tmp_path):
    """A pickle may name any callable; only the tensor rebuilders are resolved, nothing is run."""
    path = tmp_path / "object.pth"
    torch.save({"w": torch.ones(1), "when": datetime.date(2015, 12, 5)}, path)
    with pytest.raises(
        TorchFileError, match=r"object.pth: the pickle refers to datetime.date; minidiff reads"
    ):
        load_torch_file(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a torch file at all", r"junk.pth: not a PyTorch file"),
        (None, r"junk.pth: no such file"),
    ],
)
def test_torch_file_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "junk.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TorchFileError, match=message):
        load_torch_file(path)


def test_torch_file_refuses_a_list(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    with pytest.raises(TorchFileError, match=r"list.pth: holds a list, not a dict of tensors"):
        load_torch_file(path)


def test_load_inception_names_the_wrong_keys(tmp_path, oracle):
    state = {k: v for k, v in oracle.state_dict().items() if not k.startswith("Mixed_7c.branch_pool")}
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)  # torchvision's network, not the FID one
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"other.pth: not the FID Inception weights .*missing keys \['Mixed_7c\.branch_pool"
    ):
        load_inception(path)


def test_features_refuse_small_or_wrong_images():
    model = InceptionV3(rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"InceptionV3: images of \(64, 64\) are below 75x75"):
        model.features(md.tensor(np.zeros((1, 3, 64, 64))), resize=False)
    with pytest.raises(
        ValueError, match=r"InceptionV3: images must have shape \(N, 3, H, W\), got \(1, 4, 8, 8\)"
    ):
        model.features(md.tensor(np.zeros((1, 4, 8, 8))))
