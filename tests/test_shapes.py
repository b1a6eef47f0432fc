"""The captioned shapes: exact drawing from the attributes, reproducible splits, captions, and the
analytic checker that reads the attributes back (near 100% on real images, and wrong where the
image is changed)."""

from __future__ import annotations

import numpy as np
import pytest

from minidiff.data import CaptionedDataset, load_dataset, load_digits, to_uint8
from minidiff.data import shapes as S


@pytest.fixture(scope="module")
def held_out():
    return S.load_shapes(600, split="held_out", seed=3)


def test_the_same_seed_gives_the_same_images_and_the_splits_differ():
    a = S.load_shapes(50, seed=1)
    b = S.load_shapes(50, seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    other = S.load_shapes(50, seed=1, split="held_out")
    assert not np.array_equal(a.geometry["cx"], other.geometry["cx"])
    assert not np.array_equal(a.images, S.load_shapes(50, seed=2).images)


def test_each_image_is_its_caption_drawn_from_the_attributes(held_out):
    pixels = to_uint8(held_out.images)
    for i in range(40):
        words = {name: S.CHOICES[name][held_out.attributes[name][i]] for name in S.ATTRIBUTES}
        assert held_out.captions[i] == (
            f"a {words['size']} {words['color']} {words['shape']} {words['position']}"
        )
        side, cx, cy = (held_out.geometry[k][i] for k in ("side", "cx", "cy"))
        assert S.SIZES[words["size"]][0] <= side <= S.SIZES[words["size"]][1]
        centre = S.POSITIONS[words["position"]]
        assert abs(cx - centre[0]) <= S.JITTER and abs(cy - centre[1]) <= S.JITTER
        # the pixel at the centre is covered whole (the triangle's is below its apex): exactly the colour
        inside = pixels[i, :, int(cy + side / 4), int(cx)]
        np.testing.assert_array_equal(inside, S.COLORS[words["color"]])
        # far from the object the background is black
        far_y, far_x = (int(32 - cy) % 32, int(32 - cx) % 32)
        if abs(far_y - cy) > side and abs(far_x - cx) > side:
            np.testing.assert_array_equal(pixels[i, :, far_y, far_x], 0)


def test_coverage_is_the_area_of_each_shape():
    side = 12.0
    for shape, area in (("square", side**2), ("circle", np.pi / 4 * side**2), ("triangle", side**2 / 2)):
        cover = S.coverage(shape, side, 16.3, 15.8)
        # 4x4 samples per pixel: each edge pixel's share is off by up to about 1/8
        assert cover.sum() == pytest.approx(area, rel=0.03), shape
        assert 0.0 <= cover.min() and cover.max() == 1.0
    # the triangle points up: its top rows are narrower than its bottom rows
    rows = S.coverage("triangle", side, 16.0, 16.0).sum(axis=1)
    assert rows[11] < rows[20]


def test_images_at_64_pixels_scale_every_coordinate():
    small, large = S.load_shapes(20, seed=5), S.load_shapes(20, image_size=64, seed=5)
    assert large.images.shape == (20, 3, 64, 64)
    assert small.captions == large.captions
    np.testing.assert_allclose(large.geometry["cx"], 2 * small.geometry["cx"])
    assert S.score(large.images, S.attributes_of(large))["all"] == 1.0


def test_the_checker_reads_real_held_out_images(held_out):
    result = S.score(held_out.images, S.attributes_of(held_out))
    for name in S.ATTRIBUTES:
        assert result[name] >= 0.99, (name, result)
    assert result["all"] >= 0.99


def test_the_checker_notices_a_changed_image(held_out):
    images = held_out.images[:60]
    found = S.read_attributes(images)
    # swap red and blue: red, blue and purple objects change colour
    swapped = S.read_attributes(images[:, ::-1])
    moved = np.isin(held_out.attributes["color"][:60], [S.CHOICES["color"].index(c) for c in ("red", "blue")])
    assert (swapped["color"][moved] != found["color"][moved]).all()
    # upside down, a triangle points down: no longer read as a triangle; squares stay squares
    flipped = S.read_attributes(images[:, :, ::-1])
    triangle, square = S.SHAPES.index("triangle"), S.SHAPES.index("square")
    shapes = held_out.attributes["shape"][:60]
    assert (flipped["shape"][shapes == triangle] != triangle).all()
    assert (flipped["shape"][shapes == square] == square).all()
    # a black image has no object
    assert (S.read_attributes(np.full((2, 3, 32, 32), -1.0))["color"] == -1).all()


def test_captions_drop_attributes_and_parse_back():
    attributes = {name: np.zeros(200, dtype=np.int64) for name in S.ATTRIBUTES}
    captions = S.drop_attributes(attributes, np.random.default_rng(0), p=0.5)
    assert "a small red circle at the top left" in captions
    assert "a red circle" in captions and "a circle" in captions
    assert all("circle" in c for c in captions)
    assert S.parse_caption("a red circle") == {"color": 0, "shape": 0}
    assert S.parse_caption("a large white triangle in the center") == {
        "size": 1,
        "color": 5,
        "shape": 2,
        "position": 4,
    }
    with pytest.raises(ValueError, match="more than one color"):
        S.parse_caption("a red blue circle")


def test_digits_get_captions():
    digits = S.caption_digits(load_digits())
    assert digits.captions[int(np.argmax(digits.labels == 7))] == "a handwritten seven"
    assert set(" ".join(digits.captions).split()) <= set(S.WORDS)


def test_load_dataset_shapes_and_a_split_keeps_captions_with_their_images():
    data = load_dataset("shapes")
    assert isinstance(data, CaptionedDataset) and data.images.shape[1:] == (3, 32, 32)
    train, held = data.subset(np.arange(100)).split(0.2, seed=0)
    assert isinstance(held, CaptionedDataset) and len(held) == 20
    np.testing.assert_array_equal(S.read_attributes(held.images)["shape"], held.attributes["shape"])
    assert held.captions == tuple(S.captions_of(held.attributes))
    with pytest.raises(ValueError, match="take no path"):
        load_dataset("shapes:/x")
    with pytest.raises(ValueError, match="split"):
        S.load_shapes(10, split="test")
    with pytest.raises(ValueError, match="captions"):
        CaptionedDataset(data.images[:2], None, None, "x", captions=("one",))
