"""Super-token pictures (`stvit.visualize`): on real photographs that scikit-image ships (inside its
wheel, not downloaded), STA's association clusters have a lower within-cluster colour variance than
the plain grid; the labels, maps and the variance by hand; the model mode and its errors."""
import os

import pytest
import torch

import stvit
from stvit import visualize as V
from stvit.train import CHECKPOINT_FORMAT

TINY = dict(embed_dim=[16, 24, 32, 40], depths=[2, 1, 1, 1], num_heads=[1, 2, 2, 4], projection=48)


def _photo(name):
    skimage_data = pytest.importorskip("skimage.data")
    path = os.path.join(os.path.dirname(skimage_data.__file__), name)
    assert os.path.isfile(path), f"{name} is not shipped inside scikit-image's package"
    return path


@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png"])
def test_rgb_clusters_follow_the_colours(tmp_path, name):
    out = tmp_path / "fig.png"
    stats = V.main([_photo(name), "--out", str(out), "--max-side", "256", "--stoken-size", "16",
                    "--n-iter", "5"])
    import matplotlib.image

    png = matplotlib.image.imread(str(out))
    assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 1000
    assert png[..., :3].std() > 0.05                       # a picture, not a blank canvas
    # measured: 0.58 (chelsea), 0.62 (coffee); clusters that ignore the colours give about 1
    assert stats["association"] < 0.75 * stats["grid"], stats


def test_rgb_association_is_sta():
    """The association is STA's own: the same as stvit_kernels.associate on the standardised colours,
    and it sums to 1 over the 9 neighbours."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 32, 48, generator=g)
    a = V.rgb_association(img, (8, 16), n_iter=5, backend="reference")
    assert a.affinity.shape == (9, 32, 48) and a.grid == (4, 3)
    torch.testing.assert_close(a.affinity.sum(0), torch.ones(32, 48))
    x = ((img - img.mean((1, 2), keepdim=True)) / (img.std((1, 2), keepdim=True) + 1e-6))[None]
    import stvit_kernels as sk

    _, A = sk.associate(x, torch.nn.functional.avg_pool2d(x, (8, 16)), (8, 16), n_iter=5, backend="reference")
    torch.testing.assert_close(a.affinity, A[0])


def test_cluster_colour_variance_by_hand():
    img = torch.zeros(3, 4, 4)
    img[0, :, :2] = 1.0                                    # left half red, right half blue
    img[2, :, 2:] = 1.0
    by_colour = torch.tensor([[0, 0, 1, 1]] * 4)
    by_rows = torch.tensor([[0] * 4] * 2 + [[1] * 4] * 2)
    assert V.cluster_colour_variance(img, by_colour) == 0.0
    # each row cluster is half red, half blue: mean (0.5, 0, 0.5), squared distance 0.25 + 0.25
    assert V.cluster_colour_variance(img, by_rows) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="do not match"):
        V.cluster_colour_variance(img, by_rows[:2])


def _assoc_pointing(H, W, size, k_of_pixel):
    """An association in which every pixel puts all its weight on neighbour ``k_of_pixel(i, j)``."""
    A = torch.zeros(9, H, W)
    for i in range(H):
        for j in range(W):
            A[k_of_pixel(i, j), i, j] = 1.0
    h, w = size
    return V.Association(A, torch.zeros(1, H // h, W // w), size, 1)


def test_hard_labels_and_token_map():
    # every pixel chooses its right neighbour (k = 5); in the last column that one is outside the
    # grid: the argmax must skip it and fall on the first valid neighbour instead
    a = _assoc_pointing(4, 6, (2, 2), lambda i, j: 5)
    lab = V.hard_labels(a)
    grid = V.grid_labels(4, 6, 2)
    assert torch.equal(lab[:, :4], grid[:, :4] + 1)
    # (all weights 0, ties) a pixel of cell (0, 2) falls on its first valid neighbour, k = 3: cell
    # (0, 1) = index 1; one of cell (1, 2) on k = 0: cell (0, 1) too
    assert lab[0, 5] == 1 and lab[2, 5] == 1
    m = V.token_map(a, 0, 1)                               # pixels of cell (0, 0) point at (0, 1)
    assert torch.equal(m[:2, :2], torch.ones(2, 2)) and m[:2, 2:].sum() == 0
    with pytest.raises(ValueError, match="outside the 2x3 grid"):
        V.token_map(a, 2, 0)


def _tiny_checkpoint(path, **kw):
    model = stvit.stvit_small(num_classes=10, **dict(TINY, **kw))
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"model": "stvit_small", "num_classes": 10,
                "model_kwargs": dict(TINY, **kw)}, "model": model.state_dict()}, path)
    return model


def test_model_mode_draws_stage1_association(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    _tiny_checkpoint(ckpt)
    out = tmp_path / "fig.png"
    stats = V.main([_photo("astronaut.png"), "--out", str(out), "--checkpoint", str(ckpt),
                    "--img-size", "64", "--n-iter", "3", "--block", "0"])
    assert out.is_file() and out.stat().st_size > 10_000
    assert set(stats) == {"grid", "association", "ratio"}
    net, name = V.load_backbone(str(ckpt))
    assert name == "stvit_small" and net.features_only and net.embed_dim == TINY["embed_dim"]
    img = torch.rand(3, 64, 64)
    a = V.model_association(net, img, block=-1)
    assert a.stride == 4 and a.grid == (2, 2) and a.affinity.shape == (9, 16, 16)
    torch.testing.assert_close(a.affinity.sum(0), torch.ones(16, 16))


def test_model_mode_errors(tmp_path, capsys):
    photo = _photo("astronaut.png")
    ckpt = tmp_path / "ckpt.pt"
    model = _tiny_checkpoint(ckpt)
    with pytest.raises(stvit.CheckpointMismatchError, match="is of stvit_small, not stvit_base"):
        V.main([photo, "--checkpoint", str(ckpt), "--model", "stvit_base", "--out", str(tmp_path / "a.png")])
    torch.save(model.state_dict(), tmp_path / "weights.pt")         # official style: weights only
    with pytest.raises(stvit.CheckpointMismatchError, match="does not hold stvit_small weights"):
        V.main([photo, "--checkpoint", str(tmp_path / "weights.pt"), "--out", str(tmp_path / "b.png")])
    with pytest.raises(ValueError, match="image size 100 does not divide by 32"):
        V.main([photo, "--checkpoint", str(ckpt), "--img-size", "100"])
    with pytest.raises(ValueError, match="2 blocks; --block 5 is out of range"):
        V.main([photo, "--checkpoint", str(ckpt), "--img-size", "64", "--block", "5"])
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pt.* does not exist"):
        V.main([photo, "--checkpoint", str(tmp_path / "nope.pt")])
    assert V.cli([str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "c.png")]) == 2
    assert "error: image " in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "c.png").exists()
