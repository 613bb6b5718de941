"""Settings of the training jobs and the vocabulary they share: the one definition of each.

The API validates the ``config`` of a job against these models when the job is submitted (a bad
key is a 422 naming it, not a worker failure minutes later), the worker and the ML core
(:func:`segassist.models.pretrain.pretrain`, :func:`segassist.models.fewshot.fit_segmenter`) run on the same models,
and the benchmarks and the client import the names from here. Torch-free (pydantic only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DEFAULT_HEAD",
    "IGNORE_INDEX",
    "METHODS",
    "OBJECTIVES",
    "PROBE_HEADS",
    "QUICK_SCRATCH",
    "REFINE_SCRATCH",
    "FewShotConfig",
    "Method",
    "Objective",
    "PretrainConfig",
    "ProbeHead",
]

IGNORE_INDEX = 255
"""Label value of an unannotated voxel: it contributes no loss and no metric."""

Objective = Literal["pix2rep", "pix2rep_barlow", "iic_boundary"]
"""Name of a self-supervised pretraining objective (METHODS.md, :mod:`segassist.models.objectives`)."""

Method = Literal["linear", "finetune", "mean_teacher", "auto"]
"""Name of a few-shot method (METHODS.md, "Downstream"; :mod:`segassist.models.fewshot`); ``"auto"``:
the candidate that validates best on held-out labelled pixels (the middle labelled slice) within
``FewShotConfig.auto_budget_seconds`` (:func:`segassist.models.method_selection.select_method`)."""

ProbeHead = Literal["linear", "mlp"]

DEFAULT_HEAD: ProbeHead = "linear"
"""The probe head used unless one is asked for. The MLP head scores better (27 of 30 probe cells of
``bench/results/slice_prior/fewshot.md``, e.g. abdominal CT k = 3: 0.33 vs 0.16) but one fit
takes 5.8–7.9 s on 2 cores where the linear head takes 0.9–1.3 s (300 steps, 3 labelled slices;
spine and abdominal CT), which alone exceeds the interactive loop's 5 s from a corrected label to
its segmentation. ``head="mlp"`` asks for it."""
"""A segmentation head of :class:`segassist.models.networks.segmenter.SegmenterNet`."""

PROBE_HEADS: tuple[ProbeHead, ...] = get_args(ProbeHead)
"""Every :data:`ProbeHead`, cheapest first: the candidates of ``head="auto"``."""

OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
"""Every :data:`Objective`, in the order the benchmarks report them."""

METHODS: tuple[Method, ...] = get_args(Method)
"""Every :data:`Method`, cheapest first (``"auto"`` last: it fits several)."""

_Positive = Annotated[int, Field(ge=1)]
_Fraction = Annotated[float, Field(ge=0, lt=1)]


def _check_keys(model: type[BaseModel], data: Mapping[str, Any], what: str) -> None:
    known = set(model.model_fields)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; known: {sorted(known)}")


class PretrainConfig(BaseModel):
    """Settings of a pretraining run. Defaults are sized for a 2-core CPU.

    Attributes:
        objective: ``"pix2rep"``, ``"pix2rep_barlow"`` or ``"iic_boundary"`` (METHODS.md).
        modality: ``"CT"``, ``"MR"``, …; passed to the objective (edge exponent of
            ``iic_boundary``).
        steps: optimisation steps. 1000 steps of 8 crops of 128×128 take tens of minutes on
            2 CPU cores with the default channels.
        batch_size: slices per step (each gives two views).
        lr: Adam learning rate (the papers are silent on ours; 1e-3 is Adam's usual default).
        weight_decay: Adam weight decay (L2), 1e-5.
        image_size: side of the square training crop. Slices are kept at their native
            resolution (the encoder runs at native resolution downstream, in few-shot training
            and in the ONNX predictor, so pretraining sees the same pixel scale; the views'
            zoom-crop adds scale variation around it): each slice is zero-padded to a multiple
            of the network's ``size_divisor`` and a random ``image_size`` crop is taken; when a
            slice of the batch is smaller, the whole batch uses the smallest padded size instead.
        axis: voxel axis the slices are taken along (0, 1 or 2).
        seed: seed of the initial weights, and (with the step index) of every step's draws.
        checkpoint_every: steps between checkpoints.
        channels: U-Net channels per level, fine to coarse (:class:`DenseUNet`): at least two
            levels of at least 2 channels each, as the network requires.
        num_clusters: K, the clusters of the cluster head (the objective's for
            ``iic_boundary``, k-means on the features otherwise).
        kmeans_slices: slices (spread evenly over the volumes) whose features feed k-means.
        objective_overrides: keyword overrides of the objective's defaults, e.g.
            ``{"temperature": 0.3}``.
        device: torch device of the run (``"cpu"``, ``"cuda"``); bit-exact resumption is
            guaranteed on the CPU only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    objective: Objective = "pix2rep"
    modality: str = "MR"
    steps: _Positive = 1000
    batch_size: _Positive = 8
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = 1e-5
    image_size: _Positive = 128
    axis: int = Field(default=2, ge=0, le=2)
    seed: int = 0
    checkpoint_every: _Positive = 50
    # at least two levels: checked below (pydantic's own length check would count the levels
    # left after a bad one was dropped), documented in the schema as minItems
    channels: Annotated[
        tuple[Annotated[int, Field(ge=2)], ...], Field(json_schema_extra={"minItems": 2})
    ] = (16, 32, 64, 128)
    num_clusters: _Positive = 20
    kmeans_slices: int = 32
    objective_overrides: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"

    @field_validator("channels")
    @classmethod
    def _unet_levels(cls, channels: tuple[int, ...]) -> tuple[int, ...]:
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")
        return channels

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (tuples become lists)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        Raises:
            ValueError: on unknown keys, or on a value of the wrong type or out of range
                (``pydantic.ValidationError``, which names the field).
        """
        _check_keys(cls, data, "pretraining")
        return cls.model_validate(dict(data))


QUICK_SCRATCH: dict[str, Any] = {"steps": 100, "batch_size": 2, "eval_every": 10, "patience": 3}
"""Overrides of :meth:`FewShotConfig.for_scratch` for a network from scratch that trains in
seconds to tens of seconds on 2 cores: the benchmark's default profile (the "random init,
fine-tune" row of ``bench/results/fewshot.md``)."""

REFINE_SCRATCH: dict[str, Any] = QUICK_SCRATCH | {"steps": 300, "patience": 6}
"""Overrides of :meth:`FewShotConfig.for_scratch` for the background refinement's network
(:mod:`segassist.worker.refine`): :data:`QUICK_SCRATCH` trained up to three times longer.
Measured (``bench/results/refinement/refinement.md``, what the annotator ends with, 3 seeds,
k = 3/5, against the same with :data:`QUICK_SCRATCH`): spine CT 0.746/0.817 → 0.760/0.832,
spine MR 0.674/0.778 → 0.677/0.812, abdominal CT 0.807/0.870 → 0.840/0.909, brain MR
0.856/0.834 → 0.874/0.857; mean over 30 runs 0.828 → 0.846; a refinement (two fits on one
thread) 19–86 s instead of 13–36 s."""


class FewShotConfig(BaseModel):
    """Settings of few-shot training; defaults from METHODS.md where it gives them.

    Attributes:
        axis: slice axis; ``None`` = the encoder's pretraining axis.
        head: ``"linear"`` (1×1 conv; the default, :data:`DEFAULT_HEAD`), ``"mlp"`` (1×1
            conv, ReLU, 1×1 conv) segmentation head, or ``"auto"``: a probe fits both on the annotated pixels outside held-out tiles
            and keeps the one with the better Dice on the held-out pixels
            (:func:`segassist.models.fewshot.select_probe_head`; three probe fits instead of one; a
            fine-tune reads ``"auto"`` as linear). Probe heads train on per-channel standardised
            features, folded into the first convolution afterwards. The MLP head's failure on
            the 4-channel toy encoder of the service tests was a 5-step budget on raw decoder
            maps (ReLU outputs, mean 0.3, std 0.6): the outcome was the initial draw's (MLP Dice
            0.16 ± 0.13 over 9 encoder × head seeds, linear 0.16 ± 0.15; standardised, MLP
            0.31 ± 0.12, and 0.42 vs linear's 0.34 once converged); with a large offset and a
            small class shift neither head learns in 60 steps on raw features and both do on
            standardised ones (``tests/models/test_probe_head.py``).
        multiscale: whether the head also reads the coarser decoder maps (upsampled). On by
            default: measured on the TPTBox spine CT (3 labelled slices), a linear probe on the
            last decoder block alone (16 channels) could not even fit the labelled slices for
            the vertebral body (Dice 0.02 on them), reading all decoder maps it reached 0.58 on
            them and 0.36 on the unlabelled slices; a structure defined by its context rather
            than its intensity needs the coarser maps.
        seed: seed of the head's initial weights, batches, hold-out and augmentation.
        linear_lr: Adam lr of the linear probe (7.6e-3, Pix2Rep).
        linear_steps: full-batch steps of the linear probe.
        linear_max_pixels: annotated pixels the probe trains on (full batch); beyond, a
            uniform random subset drawn once. 16,384 (7 MB of 112-channel rows) rather than
            65,536: measured with 3 labelled slices, the Dice on the unlabelled slices was the
            same (MNI152 grey/white 0.660/0.648 vs 0.667/0.643; TPTBox CT has fewer annotated
            pixels than either), while 300 steps took 2.9 s instead of 16.8 s on a loaded
            2-core machine (the larger matrix no longer fits the cache).
        encoder_lr: Adam lr of the encoder when fine-tuning (5e-5, Pix2Rep).
        head_lr: Adam lr of the head when fine-tuning (1e-2, Pix2Rep).
        weight_decay: Adam weight decay.
        steps: maximum steps of ``"finetune"`` / ``"mean_teacher"``.
        batch_size: annotated slices per step (drawn with replacement).
        eval_every: steps between evaluations of the held-out loss.
        patience: evaluations without improvement before stopping early.
        holdout_fraction: share of the labelled pixels held out for early stopping. The papers
            are silent; with 1–3 annotated slices, holding out whole slices would remove a large
            part of the supervision, so instead every annotated slice is cut into
            ``holdout_tile``×``holdout_tile`` tiles and this fraction of the tiles (drawn with
            the seed) is held out: spatial blocks are less correlated with the training pixels
            than random pixels. The weights with the lowest held-out loss are returned.
        holdout_tile: tile side in pixels.
        ema_decay: Mean Teacher EMA decay (0.99).
        consistency_weight: Mean Teacher maximum consistency weight (10).
        consistency_rampup: share of ``steps`` over which the weight ramps up as
            ``w·exp(−5(1−t)²)`` (the Mean Teacher paper's sigmoid ramp-up).
        unlabelled_batch_size: unannotated slices per Mean Teacher step.
        augment: whether ``"finetune"`` / ``"mean_teacher"`` augment the annotated slices.
        aug_prob: probability of the random affine per slice.
        rotate_degrees: affine rotation range ±degrees.
        scale_range: affine zoom range ±fraction.
        translate_fraction: affine translation range ±fraction of the slice size.
        scratch_max_side: a network trained from a random initialisation (``"finetune"`` or
            ``"mean_teacher"`` of :meth:`~segassist.models.pretrain.Encoder.random`: the
            refinement's network, ``"auto"``'s scratch candidate, the benchmark's random-init
            rows) on slices whose longer side exceeds this runs on them averaged in-plane by
            the smallest integer factor that brings it within (``SegmenterNet.pool``; its
            scores brought back to native resolution inside the network, so the exported model
            takes native slices). A step's cost grows with the pixels and more beyond the CPU's
            caches: on one core, a scratch network's step on two 512×512 slices took 3.9 s,
            on two 256×256 ones 0.58 s. Through the service on TotalSegmentator's DICOM
            example CT (512×512×20, liver, spleen, stomach and aorta, 3 labelled slices,
            pooled 2×), the refinement took 9.5 min instead of about 38 (3.75 s a step at full
            resolution, beside the background pretraining), Dice 0.951 against 0.952 (a
            second task on it, offline, one seed: 0.865 against 0.784). Not cropped windows
            instead: the network's instance norm then sees other statistics in training than
            on whole slices (a disc test: 0.94 → 0.82 at windows of 32 of 40 pixels). A
            network from scratch has no pixel scale to keep; a pretrained encoder has (it is
            never pooled). 0 keeps native resolution. The benchmark's slices are at
            most 122 pixels a side: 256 leaves them as they were.
        device: torch device.
        slice_prior: whether the assist workflow fuses each labelled image's prediction with
            the interpolation of its own labelled slices (a prior whose weight fades with the
            distance to the nearest labelled slice; :mod:`segassist.models.slice_prior`) before
            the argmax. Images without labels are predicted by the model alone either way.
        seeded_components: whether the assist workflow then removes, per class, the predicted
            3D objects that hold none of the annotator's voxels of that class, when the
            labelled slices show the class as one connected object
            (:mod:`segassist.models.seeded_components`; classes the labelled slices show as
            several objects keep them all). Labelled images only, like ``slice_prior``.
        propagation_max_voxels: a labelled image is predicted by propagating its labelled
            slices through the affinity of adjacent slices' decoder map 0 (Sli2Vol-style,
            :mod:`segassist.models.propagation`; probe methods, whose maps are cached) instead
            of by the probe, then fused with the slice prior at the default strength and
            filtered like the probe's prediction, on a grid of at most this many voxels: a
            larger image's slices are pooled in-plane by the smallest integer factor that fits
            (:attr:`segassist.models.propagation.PropagationConfig.max_voxels`) and the
            probabilities brought back to full resolution. Images without labels get the
            probe; 0 turns propagation off. Measured (``bench/results/propagation/fewshot.md``,
            4 volumes, pretrained encoders): propagation alone 0.69/0.75/0.83 mean Dice at
            k = 1/3/5 where the MLP probe + prior scored 0.43/0.64/0.74. Its cost grows with
            the grid's voxels (about two slice-to-slice steps per unlabelled slice): 2.5–3.9 s
            for 122×101×112 on 2 CPU cores, so the 4 M voxel default keeps it to about 10 s
            (a 512×512×300 CT at full resolution would take about 25 min).
        auto_budget_seconds: time budget of ``method="auto"``'s candidate fits
            (:mod:`segassist.models.method_selection`): the probe heads always run; fine-tuning
            and scratch only when their estimated cost fits in what is left. 5 s, the
            interactive loop's budget for a corrected label → segmentation on 2 cores: by
            default auto picks between the probe heads (a few seconds on cached maps), and a
            network candidate (hundreds of steps at a fraction of a second or more each) needs
            a budget raised to minutes. The budget bounds the candidate fits, not the final
            refit of a winning probe; measured on a loaded 2-core machine (spine CT and
            TotalSegmentator MR, k = 1 and 3, ``bench/results/method_selection.md``), auto's fit
            phase took 7–20 s where the default linear probe took 1–2 s, so ``"linear"`` stays
            the assist default.
        refine: whether an assist whose labelled images were propagated, each with at least
            three labelled slices, queues a background job that trains a network from scratch
            on them and replaces the segmentation with the network's blend with the propagation
            when that blend does better on a held-out labelled slice
            (:mod:`segassist.worker.refine`). The assist's answer comes first; the
            refinement's, if any, seconds to minutes later (``refine_max_voxels``).
        refine_max_voxels: the refinement predicts every slice and holds its candidates at
            full resolution (its network runs pooled on slices over ``scratch_max_side``), so
            only labelled images of at most this many voxels are refined (the propagation's
            grid may be pooled); the default admits a 512×512×300 CT. Its worker holds two
            ``L×X×Y×Z`` float32 volumes of class probabilities at the peak (``8L`` bytes a
            voxel) besides the image. Measured on 2 CPU cores: 19–86 s for the benchmark's
            volumes (≤ 1.4 M voxels); a 513×367×191 CT (36 M voxels, 3 classes) in 4.9 min,
            its worker's resident memory peaking at 3.7 GB (1.2 GB of it the cached feature
            map read from disk; 6.7 GB before the candidates were made one at a time); a
            513×513×300 CT (79 M) in 8.0 min, peaking at 6.6 GB (2.5 GB of it the map).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    axis: Annotated[int, Field(ge=0, le=2)] | None = None
    head: Literal["linear", "mlp", "auto"] = DEFAULT_HEAD
    multiscale: bool = True
    seed: int = 0
    linear_lr: float = 7.6e-3
    linear_steps: _Positive = 300
    linear_max_pixels: int = 16_384
    encoder_lr: float = 5e-5
    head_lr: float = 1e-2
    weight_decay: float = 1e-5
    steps: _Positive = 500
    batch_size: _Positive = 4
    eval_every: _Positive = 25
    patience: _Positive = 6
    holdout_fraction: _Fraction = 0.2
    holdout_tile: int = 32
    ema_decay: _Fraction = 0.99
    consistency_weight: float = 10.0
    consistency_rampup: float = 0.3
    unlabelled_batch_size: int = 4
    augment: bool = True
    aug_prob: float = 0.8
    rotate_degrees: float = 15.0
    scale_range: float = 0.1
    translate_fraction: float = 0.05
    scratch_max_side: Annotated[int, Field(ge=0)] = 256
    device: str = "cpu"
    slice_prior: bool = True
    seeded_components: bool = True
    propagation_max_voxels: Annotated[int, Field(ge=0)] = 4_000_000
    auto_budget_seconds: float = Field(default=5.0, ge=0)
    refine: bool = True
    refine_max_voxels: Annotated[int, Field(ge=0)] = 80_000_000

    @classmethod
    def for_scratch(cls, **overrides: Any) -> Self:
        """Settings for the random-initialisation baseline (``Encoder.random`` + ``"finetune"``).

        A scratch encoder needs a far larger encoder lr (1e-3) than a pretrained one, more steps
        and patience, and stronger augmentation (±30°, ±20 % zoom, ±10 % shift, always applied).

        Raises:
            ValueError: as :meth:`from_dict`, on a bad override.
        """
        scratch = {
            "encoder_lr": 1e-3,
            "head_lr": 1e-3,
            "steps": 1500,
            "patience": 10,
            "aug_prob": 1.0,
            "rotate_degrees": 30.0,
            "scale_range": 0.2,
            "translate_fraction": 0.1,
        }
        return cls.from_dict(scratch | overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        Raises:
            ValueError: on unknown keys, or on a value of the wrong type or out of range
                (``pydantic.ValidationError``, which names the field).
        """
        _check_keys(cls, data, "few-shot")
        return cls.model_validate(dict(data))
