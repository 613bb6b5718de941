from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segassist.models.pretrain import CHECKPOINT_NAME, Encoder, PretrainConfig, pretrain
from segassist.models.progress import Progress


def _volume(size: int = 32, depth: int = 6, seed: int = 0) -> np.ndarray:
    """Discs of varying radius and brightness on a noisy background, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    volume = np.empty((size, size, depth), np.float32)
    for z in range(depth):
        r = 4 + 8 * z / depth
        disc = (yy - size / 2) ** 2 + (xx - size / 3) ** 2 < r**2
        volume[..., z] = 0.2 + 0.5 * disc + 0.05 * rng.standard_normal((size, size))
    return np.clip(volume, 0, 1)


def _config(**overrides: object) -> PretrainConfig:
    base: dict[str, object] = {
        "channels": (4, 8, 16),
        "image_size": 32,
        "batch_size": 2,
        "steps": 5,
        "checkpoint_every": 2,
        "num_clusters": 3,
        "kmeans_slices": 4,
        "objective_overrides": {"projection_dim": 16, "num_samples": 200},
    }
    base.update(overrides)
    return PretrainConfig(**base)  # type: ignore[arg-type]


class _Cancel(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    volumes = [_volume(seed=0), _volume(size=40, seed=1)]
    config = _config()
    reference = pretrain(volumes, config, tmp_path / "straight")

    def cancel_at_3(p: Progress) -> None:
        if p.step == 3:
            raise _Cancel

    workdir = tmp_path / "interrupted"
    with pytest.raises(_Cancel):
        pretrain(volumes, config, workdir, progress=cancel_at_3)
    assert torch.load(workdir / CHECKPOINT_NAME, weights_only=True)["step"] == 3
    seen: list[int] = []
    resumed = pretrain(volumes, config, workdir, progress=lambda p: seen.append(p.step))

    assert seen == [4, 5]
    for (name, a), b in zip(
        reference.network.state_dict().items(), resumed.network.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(reference.cluster_head.weight, resumed.cluster_head.weight)


def test_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    pretrain([_volume()], _config(steps=2), tmp_path)
    with pytest.raises(ValueError, match=r"\['lr'\] differ"):
        pretrain([_volume()], _config(steps=2, lr=5e-4), tmp_path)


def test_loss_decreases_and_progress_reports_step_total_eta(tmp_path: Path) -> None:
    reports: list[Progress] = []
    config = _config(steps=30, checkpoint_every=100, batch_size=4, lr=3e-3)
    pretrain([_volume(depth=8)], config, tmp_path, progress=reports.append)

    assert [r.step for r in reports] == list(range(1, 31))
    assert all(r.total == 30 and r.phase == "pretrain" for r in reports)
    assert all(r.eta_seconds >= 0 for r in reports) and reports[-1].eta_seconds == 0
    assert reports[0].eta_seconds > 0
    losses = np.array([r.loss for r in reports])
    assert losses[-8:].mean() < losses[:8].mean()


def test_iic_encoder_keeps_its_cluster_head_and_round_trips(tmp_path: Path) -> None:
    config = _config(objective="iic_boundary", steps=2, objective_overrides={})
    encoder = pretrain([_volume()], config, tmp_path / "work")
    assert encoder.cluster_head_source == "objective"
    assert encoder.cluster_head.out_channels == 3

    encoder.save(tmp_path / "encoder.pt")
    loaded = Encoder.load(tmp_path / "encoder.pt")
    slices = np.moveaxis(_volume(size=36), 2, 0)  # 36 is not a multiple of 4: padded and cropped
    features = encoder.features(slices)
    assert features.shape == (6, 4, 36, 36)
    torch.testing.assert_close(loaded.features(slices), features)
    torch.testing.assert_close(loaded.cluster_head(features), encoder.cluster_head(features))
    assert loaded.config == config and loaded.objective == "iic_boundary"


def test_kmeans_head_clusters_the_encoder_features(tmp_path: Path) -> None:
    volume = _volume(depth=4)
    encoder = pretrain([volume], _config(steps=2, num_clusters=3), tmp_path)
    assert encoder.cluster_head_source == "kmeans"
    features = encoder.features(np.moveaxis(volume, 2, 0))
    scores = encoder.cluster_head(features)
    assert scores.shape == (4, 3, 32, 32)
    # argmax of the head = nearest centroid (w = 2c), and every cluster is used.
    centroids = encoder.cluster_head.state_dict()["weight"][:, :, 0, 0] / 2
    pixels = features.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(pixels, centroids).argmin(1)
    assert torch.equal(scores.permute(0, 2, 3, 1).reshape(-1, 3).argmax(1), nearest)
    assert set(nearest.tolist()) == {0, 1, 2}


def test_rejects_unnormalised_volumes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="normalise"):
        pretrain([_volume() * 100], _config(), tmp_path)


def test_random_encoder_matches_pretraining_start() -> None:
    config = _config()
    a, b = Encoder.random(config), Encoder.random(config)
    assert a.objective == "random"
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
