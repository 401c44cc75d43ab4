"""The FID Inception and the preprocessing modes against pytorch-fid and clean-fid (same random weights and images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics_fixtures import photo_crops, write_pngs, write_random_inception
from uvit_cli.errors import UvitError
from uvit_cli.metrics.features import preprocess, tf1_resize_bilinear
from uvit_cli.metrics.inception import WEIGHTS_FILE, WEIGHTS_URL, load_fid_inception


@pytest.fixture()
def torch_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "torch-home-metrics"
    write_random_inception(home)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("UVIT_INCEPTION_WEIGHTS", raising=False)
    return home


def test_outputs_equal_pytorch_fid_network(torch_home):
    from pytorch_fid.inception import InceptionV3

    ref = InceptionV3([3], resize_input=False, normalize_input=False).eval()  # strict-loads our weight file
    net = ref.blocks  # pytorch-fid's FID Inception, split into blocks
    captured = {}
    mixed_6d = net[2][6]  # block 2 = Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("s", o))
    x = torch.randn(1, 3, 299, 299)
    with torch.inference_mode():
        pool = ref(x)[0].flatten(1)
        exact = load_fid_inception(exact=True)(x)
        fused = load_fid_inception()(x)
    spatial = captured["s"][:, :7].permute(0, 2, 3, 1).reshape(1, -1)  # ADM's (h, w, c) flatten, 2023-d
    fc_w = torch.load(torch_home / "hub" / "checkpoints" / WEIGHTS_FILE, weights_only=True)["fc.weight"]
    assert exact.spatial.shape == (1, 2023) and exact.logits.shape == (1, 1008)
    torch.testing.assert_close(exact.pool, pool, rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.spatial, spatial, rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.logits, pool @ fc_w.t(), rtol=1e-5, atol=1e-5)  # no fc bias
    scale = pool.abs().max()
    assert (fused.pool - pool).abs().max() < 1e-4 * scale
    assert (fused.spatial - spatial).abs().max() < 1e-4 * spatial.abs().max()


def test_missing_or_wrong_weights_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("UVIT_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(UvitError) as e:
        load_fid_inception()
    assert WEIGHTS_FILE in str(e.value) and WEIGHTS_URL in str(e.value)
    with pytest.raises(UvitError, match="does not exist"):
        load_fid_inception(tmp_path / "nope.pth")
    import torchvision

    imagenet = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(UvitError, match="not the FID Inception"):
        load_fid_inception(tmp_path / "imagenet.pth")
    monkeypatch.setenv("UVIT_INCEPTION_WEIGHTS", str(tmp_path / "imagenet.pth"))  # the env var is honoured
    with pytest.raises(UvitError, match="not the FID Inception"):
        load_fid_inception()
    torch.save({"w": object()}, tmp_path / "pickle.pth")
    with pytest.raises(UvitError, match="state dict"):
        load_fid_inception(tmp_path / "pickle.pth")


def test_pytorch_fid_mode_is_pytorch_fid_preprocessing():
    img = photo_crops(3, 40, 0)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255  # torchvision ToTensor
    expected = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.equal(preprocess(img, "pytorch_fid"), expected)
    assert torch.equal(preprocess(img, "legacy_pytorch"), expected)  # clean-fid's name for the same pipeline


def test_tf1_resize_matches_the_legacy_grid():
    # 1-D example, 2 -> 4: sources 0, 0.5, 1, 1.5 (clamped) -> v0, (v0 + v1)/2, v1, v1.
    v = torch.tensor([[[[10.0, 30.0]]]])
    out = tf1_resize_bilinear(v.expand(1, 1, 2, 2), 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([10.0, 20.0, 30.0, 30.0]))
    # Against grid_sample sampling at src = i * in/out (align_corners=True maps -1..1 onto 0..in-1).
    x = torch.rand(2, 3, 37, 23) * 255
    src_h = torch.arange(299) * (37 / 299)
    src_w = torch.arange(299) * (23 / 299)
    gy, gx = torch.meshgrid(src_h / 36 * 2 - 1, src_w / 22 * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].expand(2, -1, -1, -1)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    torch.testing.assert_close(tf1_resize_bilinear(x, 299), expected, rtol=0, atol=2e-3)
    img = photo_crops(2, 37, 1)
    got = preprocess(img, "legacy_tensorflow")
    torch.testing.assert_close(got, (tf1_resize_bilinear(torch.from_numpy(img).permute(0, 3, 1, 2).float()) - 128) / 128)


def test_clean_mode_uses_clean_fid_resizer():
    from cleanfid.resize import build_resizer

    img = photo_crops(2, 32, 2)
    fn = build_resizer("clean")
    expected = torch.from_numpy(np.stack([fn(i) for i in img])).permute(0, 3, 1, 2)
    torch.testing.assert_close(preprocess(img, "clean"), (expected - 128) / 128)
    with pytest.raises(UvitError, match="unknown --mode"):
        preprocess(img, "bicubic")
    with pytest.raises(UvitError, match="3 channels"):
        preprocess(img[..., :1], "pytorch_fid")


@pytest.mark.slow  # 20-60 s on 2 cores: 36 Inception passes at 299x299 through three pipelines
def test_features_and_fid_match_pytorch_fid_and_clean_fid(torch_home, tmp_path):
    from cleanfid import fid as cfid
    from cleanfid.features import build_feature_extractor
    from pytorch_fid import fid_score
    from pytorch_fid.inception import InceptionV3

    from uvit_cli.metrics import evaluate

    a = write_pngs(tmp_path / "a", photo_crops(6, 16, 10))
    b = write_pngs(tmp_path / "b", photo_crops(6, 16, 11) // 2 + 60)

    def pfid_features(folder):
        files = sorted(str(p) for p in folder.iterdir())
        return fid_score.get_activations(files, InceptionV3([3]).eval(), batch_size=6, dims=2048, device="cpu",
                                         num_workers=0)

    def clean_features(folder):
        model = build_feature_extractor("legacy_pytorch", torch.device("cpu"), use_dataparallel=False)
        return cfid.get_folder_features(str(folder), model, num_workers=0, batch_size=6, device=torch.device("cpu"),
                                        mode="legacy_pytorch", verbose=False)

    def fid_low_rank(f1, f2):
        """FID for N < d from the features themselves: with S_i = A_i^T A_i (A_i centred / sqrt(N_i - 1)), the
        nonzero eigenvalues of S1 S2 are those of (A1 A2^T)(A1 A2^T)^T, so Tr sqrtm(S1 S2) = ||A1 A2^T||_*."""
        a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
        a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
        nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
        return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a1 ** 2).sum() + (a2 ** 2).sum() - 2 * nuclear)

    pfid_a, pfid_b = pfid_features(a), pfid_features(b)
    clean_a, clean_b = clean_features(a), clean_features(b)
    assert np.abs(clean_a - pfid_a).max() < 1e-4 * np.abs(pfid_a).max()
    # End to end from the PNG folders (our features equal pytorch-fid's per image: see the tests above). Our
    # Fréchet distance uses the symmetric eigen form here, because scipy's sqrtm of a rank-deficient 2048x2048
    # product takes 10-40 s on a 2-core CI machine (test_metrics_math checks that both forms agree); the baselines'
    # FIDs come straight from their features by the low-rank identity above.
    ours = evaluate(a, b, metrics="fid", batch_size=6, frechet_method="eigh").metrics["fid"]
    fid_pfid, fid_clean = fid_low_rank(pfid_a, pfid_b), fid_low_rank(clean_a, clean_b)
    assert fid_pfid > 1.0  # the two sets differ, so this is not 0 vs 0
    assert ours == pytest.approx(fid_pfid, rel=1e-3)
    assert ours == pytest.approx(fid_clean, rel=1e-3)
