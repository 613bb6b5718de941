"""Self-supervised pretraining of the dense encoder on the slices of unlabelled volumes.

One step draws a batch of 2D slices, two views with known pixel correspondence
(:class:`segassist.models.views.TwoViewSampler`), and minimises the chosen objective
(:func:`segassist.models.objectives.build_objective`) on ``z1 = W_A(f(a1(x)))`` and ``z2 = f(W_A(a2(x)))``
with Adam. The loop checkpoints to ``workdir/checkpoint.pt`` and resumes from it; the batch, crops
and views of step ``t`` depend only on ``(config.seed, t)``, so an interrupted and resumed run
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from segassist.models.clusters import fit_kmeans_head
from segassist.models.networks.unet import DenseUNet
from segassist.models.objectives import Objective, build_objective
from segassist.models.progress import Progress, ProgressCallback
from segassist.models.runtime._atomic import atomic_path
from segassist.models.runtime.configs import PretrainConfig
from segassist.models.runtime.preprocess import (
    Normalisation,
    crop_to,
    default_normalisation,
    pad_to_multiple,
)
from segassist.models.views import TwoViewSampler, warp

__all__ = ["CHECKPOINT_NAME", "Encoder", "PretrainConfig", "pretrain"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
"""File name of the resumable checkpoint inside ``workdir``."""

_RESUME_FREE = frozenset({"steps", "checkpoint_every", "device"})
"""Config fields that may change between an interrupted run and its resumption."""


def _build_network(config: PretrainConfig) -> DenseUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return DenseUNet(spatial_dims=2, in_channels=1, channels=config.channels)


def _build_objective(config: PretrainConfig, feature_channels: int) -> Objective:
    overrides = dict(config.objective_overrides)
    if config.objective == "iic_boundary":
        overrides.setdefault("num_clusters", config.num_clusters)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        return build_objective(config.objective, feature_channels, config.modality, **overrides)


def _objective_cluster_head(objective: Objective) -> nn.Conv2d:
    head = objective.cluster_head
    if head is None:
        raise ValueError(f"objective {objective.name!r} has no cluster head")
    return head


ClusterHeadSource = Literal["objective", "kmeans", "random"]


class Encoder(nn.Module):
    """A pretrained (or randomly initialised) dense encoder with its cluster head.

    Attributes:
        network: the :class:`DenseUNet` (``B×1×H×W → B×C×H×W``).
        cluster_head: ``B×C×H×W → B×K×H×W`` cluster scores (argmax = cluster map): the
            objective's head for ``iic_boundary``, k-means as a 1×1 conv otherwise, random for
            :meth:`random`.
        config: the :class:`PretrainConfig` it was trained with.
        normalisation: how raw intensities were mapped to [0, 1] for it.
        objective: the objective's name, or ``"random"``.
        cluster_head_source: ``"objective"``, ``"kmeans"`` or ``"random"`` (how to rebuild
            the head's architecture on load).
    """

    def __init__(
        self,
        network: DenseUNet,
        cluster_head: nn.Module,
        config: PretrainConfig,
        normalisation: Normalisation,
        objective: str,
        cluster_head_source: ClusterHeadSource,
    ) -> None:
        super().__init__()
        self.network = network
        self.cluster_head = cluster_head
        self.config = config
        self.normalisation = normalisation
        self.objective = objective
        self.cluster_head_source = cluster_head_source

    @property
    def feature_channels(self) -> int:
        """C, channels of the dense feature map."""
        return self.network.feature_channels

    @property
    def size_divisor(self) -> int:
        """Slice sizes must be multiples of this."""
        return self.network.size_divisor

    @classmethod
    def random(cls, config: PretrainConfig, normalisation: Normalisation | None = None) -> Encoder:
        """The random-initialisation baseline: the same network as :func:`pretrain` starts from.

        Its cluster head is a random 1×1 conv (its cluster map shows nothing learnt).
        """
        network = _build_network(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 2)
            head = nn.Conv2d(network.feature_channels, config.num_clusters, kernel_size=1)
        norm = normalisation or default_normalisation(config.modality)
        return cls(network, head, config, norm, "random", "random")

    @torch.no_grad()
    def features(self, slices: np.ndarray | torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Dense features of normalised slices, at their own resolution.

        Slices are zero-padded to multiples of :attr:`size_divisor` (as the runtime does) and the
        features cropped back. Runs in eval mode without gradients, on the encoder's device.

        Args:
            slices: ``S×H×W`` or ``S×1×H×W``, normalised to [0, 1].
            batch_size: slices per forward pass.

        Returns:
            ``S×C×H×W`` float32 features on the CPU.
        """
        array = slices.detach().cpu().numpy() if isinstance(slices, torch.Tensor) else slices
        array = np.asarray(array, dtype=np.float32)
        if array.ndim == 4 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 3:
            raise ValueError(f"slices must be S×H×W or S×1×H×W, got shape {array.shape}")
        padded, size = pad_to_multiple(array, self.size_divisor)
        device = next(self.network.parameters()).device
        was_training = self.network.training
        self.network.eval()
        try:
            out = [
                self.network(torch.from_numpy(padded[i : i + batch_size, None]).to(device)).cpu()
                for i in range(0, len(padded), batch_size)
            ]
        finally:
            self.network.train(was_training)
        return torch.from_numpy(crop_to(torch.cat(out).numpy(), size))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write state dicts and a JSON-able description to ``path``, atomically."""
        payload = {
            "format": 1,
            "network": self.network.state_dict(),
            "cluster_head": self.cluster_head.state_dict(),
            "cluster_head_source": self.cluster_head_source,
            "config": self.config.to_dict(),
            "normalisation": self.normalisation.to_dict(),
            "objective": self.objective,
        }
        _atomic_save(payload, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Encoder:
        """Read an encoder written by :meth:`save` (onto the CPU).

        Raises:
            ValueError: if the file is not an encoder of a known format.
        """
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != 1:
            raise ValueError(f"{path}: not a segassist encoder file (format 1)")
        config = PretrainConfig.from_dict(payload["config"])
        network = _build_network(config)
        network.load_state_dict(payload["network"])
        source: ClusterHeadSource = payload["cluster_head_source"]
        head: nn.Module
        if source == "objective":
            head = _objective_cluster_head(_build_objective(config, network.feature_channels))
        else:
            head = nn.Conv2d(network.feature_channels, config.num_clusters, kernel_size=1)
        head.load_state_dict(payload["cluster_head"])
        norm = Normalisation.from_dict(payload["normalisation"])
        return cls(network, head, config, norm, payload["objective"], source)


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _step_generator(seed: int, step: int) -> tuple[torch.Generator, int]:
    """A generator whose state depends only on ``(seed, step)``, and its seed."""
    step_seed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    return torch.Generator().manual_seed(step_seed), step_seed


class _SlicePool:
    """All non-constant slices along ``axis`` of the volumes, drawn as padded square crops."""

    def __init__(self, volumes: list[np.ndarray], axis: int, size_divisor: int) -> None:
        self.volumes = volumes
        self.axis = axis
        self.size_divisor = size_divisor
        self.index: list[tuple[int, int]] = []
        for v, volume in enumerate(volumes):
            other = tuple(a for a in range(3) if a != axis)
            varying = np.ptp(volume, axis=other) > 0
            self.index.extend((v, int(s)) for s in np.flatnonzero(varying))
        if not self.index:
            raise ValueError("every slice of every volume is constant: nothing to learn from")

    def slice(self, v: int, s: int) -> np.ndarray:
        padded, _ = pad_to_multiple(np.take(self.volumes[v], s, axis=self.axis), self.size_divisor)
        return padded

    def draw(self, generator: torch.Generator, batch_size: int, image_size: int) -> torch.Tensor:
        """``B×1×h×w`` float32 crops; ``h, w ≤ image_size`` (see :class:`PretrainConfig`)."""
        picks = torch.randint(len(self.index), (batch_size,), generator=generator).tolist()
        slices = [self.slice(*self.index[i]) for i in picks]
        h = min(image_size, *(s.shape[0] for s in slices))
        w = min(image_size, *(s.shape[1] for s in slices))
        h, w = (max(self.size_divisor, d - d % self.size_divisor) for d in (h, w))
        crops = []
        for s in slices:
            y = int(torch.randint(s.shape[0] - h + 1, (1,), generator=generator))
            x = int(torch.randint(s.shape[1] - w + 1, (1,), generator=generator))
            crops.append(s[y : y + h, x : x + w])
        return torch.from_numpy(np.stack(crops)[:, None].astype(np.float32))


def _check_volumes(volumes: list[np.ndarray]) -> None:
    if not volumes:
        raise ValueError("no volumes to pretrain on")
    for i, volume in enumerate(volumes):
        if volume.ndim != 3:
            raise ValueError(f"volume {i} must be 3D (X×Y×Z), got shape {volume.shape}")
        if not np.isfinite(volume).all():
            raise ValueError(f"volume {i} holds NaN or infinite values")
        lo, hi = float(volume.min()), float(volume.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"volume {i} spans [{lo:.3g}, {hi:.3g}]: normalise volumes to [0, 1] first"
            )


def _load_checkpoint(path: Path, config: PretrainConfig) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    current = config.to_dict()
    differ = sorted(k for k in current if k not in _RESUME_FREE and saved.get(k) != current[k])
    if differ:
        raise ValueError(
            f"checkpoint {path} was written with a different config ({differ} differ); "
            "use another workdir or the same config"
        )
    return state


def pretrain(
    volumes: list[np.ndarray],
    config: PretrainConfig,
    workdir: str | os.PathLike[str],
    progress: ProgressCallback | None = None,
    normalisation: Normalisation | None = None,
) -> Encoder:
    """Pretrain a dense encoder, resuming from ``workdir/checkpoint.pt`` if present.

    Args:
        volumes: ``X×Y×Z`` float volumes already normalised to [0, 1] (by ``normalisation``).
        config: run settings.
        workdir: directory of the resumable checkpoint (created if missing).
        progress: called after every step with ``Progress(step, total, loss, eta, "pretrain")``
            (``loss`` of that step; ``eta`` from the mean step time of this process). If it
            raises, the state after that step is checkpointed and the exception propagates.
        normalisation: recorded in the encoder (defaults to the modality's default).

    Returns:
        The trained :class:`Encoder` (eval mode, CPU), with its cluster head.

    Raises:
        ValueError: on empty, non-3D or non-normalised volumes, or a checkpoint in ``workdir``
            written with a different config.
    """
    _check_volumes(volumes)
    norm = normalisation or default_normalisation(config.modality)
    device = torch.device(config.device)
    checkpoint = Path(workdir) / CHECKPOINT_NAME

    network = _build_network(config)
    objective = _build_objective(config, network.feature_channels)
    pool = _SlicePool(volumes, config.axis, network.size_divisor)
    sampler = TwoViewSampler()
    network.to(device).train()
    objective.to(device).train()
    params = [*network.parameters(), *objective.parameters()]
    optimiser = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    start = 0
    state = _load_checkpoint(checkpoint, config)
    if state is not None:
        network.load_state_dict(state["network"])
        objective.load_state_dict(state["objective"])
        optimiser.load_state_dict(state["optimizer"])
        start = int(state["step"])
        logger.info("resuming pretraining from %s at step %d", checkpoint, start)

    def save(step: int) -> None:
        _atomic_save(
            {
                "step": step,
                "config": config.to_dict(),
                "network": network.state_dict(),
                "objective": objective.state_dict(),
                "optimizer": optimiser.state_dict(),
            },
            checkpoint,
        )

    began = time.monotonic()
    for step in range(start, config.steps):
        generator, step_seed = _step_generator(config.seed, step)
        x = pool.draw(generator, config.batch_size, config.image_size)
        views = sampler.sample(x, generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed)  # any global-RNG consumer (dropout) is per-step too
            both = network(torch.cat([views.view1, views.view2]).to(device))
            f1, z2 = both.chunk(2)
            z1 = warp(f1, views.theta.to(device))
            loss, logs = objective(z1, z2, views.valid.to(device), views.image_warped.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
            logger.info("pretrain step %d/%d loss %.4f %s", done, config.steps, loss.item(), logs)
        if progress is not None:
            elapsed = time.monotonic() - began
            eta = elapsed / (done - start) * (config.steps - done)
            try:
                progress(Progress(done, config.steps, float(loss.item()), eta, "pretrain"))
            except BaseException:
                save(done)
                raise

    network.eval()
    cluster_head: nn.Module
    source: ClusterHeadSource
    if config.objective == "iic_boundary":
        cluster_head, source = copy.deepcopy(_objective_cluster_head(objective)), "objective"
    else:
        cluster_head, source = nn.Conv2d(1, 1, 1), "kmeans"  # replaced below
    encoder = Encoder(network.cpu(), cluster_head.cpu(), config, norm, config.objective, source)
    if source == "kmeans":
        encoder.cluster_head = _kmeans_head(encoder, pool, config)
    return encoder.eval()


def _kmeans_head(encoder: Encoder, pool: _SlicePool, config: PretrainConfig) -> nn.Conv2d:
    """k-means on the features of ``config.kmeans_slices`` slices spread over the pool."""
    count = min(config.kmeans_slices, len(pool.index))
    picks = np.linspace(0, len(pool.index) - 1, count).round().astype(int)
    rows = []
    for i in picks:
        v, s = pool.index[i]
        feats = encoder.features(np.take(pool.volumes[v], s, axis=pool.axis)[None])
        rows.append(feats[0].flatten(1).T)
    return fit_kmeans_head(torch.cat(rows), config.num_clusters, seed=config.seed)
