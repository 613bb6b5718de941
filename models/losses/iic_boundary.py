"""Regularised IIC clustering loss with a boundary-aware cross-correlation term (Peng et al.)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BoundaryCrossCorrelationLoss",
    "IICBoundaryLoss",
    "RegularisedIICLoss",
    "edge_map",
    "joint_distribution",
    "local_ncc",
    "masked_minmax",
    "regularised_mi",
    "uncertainty_map",
]


def _check_maps(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> None:
    if p.ndim != 4:
        raise ValueError(f"cluster probabilities must be B×K×H×W, got shape {tuple(p.shape)}.")
    if p.shape != q.shape:
        raise ValueError(f"q has shape {tuple(q.shape)}, differing from p {tuple(p.shape)}.")
    expected = (p.shape[0], 1, *p.shape[2:])
    if tuple(valid.shape) != expected:
        raise ValueError(f"valid mask must have shape {expected}, got {tuple(valid.shape)}.")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid mask must be bool, got {valid.dtype}.")
    if not bool(valid.any()):
        raise ValueError("the valid mask has no pixel.")


def joint_distribution(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    r"""Symmetrised joint cluster distribution over valid pixels.

    .. math:: P = \frac{1}{N} \sum_n p_n q_n^\top, \qquad P \leftarrow (P + P^\top) / 2.

    Args:
        p: ``B×K×H×W`` probabilities of view 1.
        q: ``B×K×H×W`` probabilities of view 2, pixel-aligned with ``p``.
        valid: ``B×1×H×W`` bool.

    Returns:
        ``K×K`` joint, summing to 1.
    """
    mask = valid[:, 0]
    pv = p.permute(0, 2, 3, 1)[mask].float()
    qv = q.permute(0, 2, 3, 1)[mask].float()
    joint = pv.T @ qv / pv.shape[0]
    return (joint + joint.T) / 2


def regularised_mi(joint: torch.Tensor, alpha: float, lam: float, eps: float) -> torch.Tensor:
    r"""Regularised mutual-information loss of a ``K×K`` joint (balance + consistency).

    .. math::
        L_{RMI} = -\sum_{ij} \Big[\alpha \frac{\delta_{ij}}{K} + (1 - \alpha) P_{ij}\Big]
        \log(P_{ij} + \epsilon) + \lambda \sum_{ij} P_{ij} \big(\log(P_i + \epsilon)
        + \log(P_j + \epsilon)\big),

    with marginals :math:`P_i = \sum_j P_{ij}`, :math:`P_j = \sum_i P_{ij}`. ``alpha=0, lam=1`` is
    :math:`-I(P)` (plain IIC); ``alpha=1`` pulls the joint toward ``diag(1/K)``.
    """
    k = joint.shape[0]
    target = alpha * torch.eye(k, dtype=joint.dtype, device=joint.device) / k + (1 - alpha) * joint
    log_pi = torch.log(joint.sum(dim=1, keepdim=True) + eps)
    log_pj = torch.log(joint.sum(dim=0, keepdim=True) + eps)
    return -(target * torch.log(joint + eps)).sum() + lam * (joint * (log_pi + log_pj)).sum()


def masked_minmax(v: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Min-max rescale each ``B×1×H×W`` map to [0, 1] over its masked pixels; 0 outside the mask."""
    lo = v.masked_fill(~mask, float("inf")).amin(dim=(-2, -1), keepdim=True)
    hi = v.masked_fill(~mask, float("-inf")).amax(dim=(-2, -1), keepdim=True)
    present = mask.any(dim=-1, keepdim=True).any(dim=-2, keepdim=True)
    lo = torch.where(present, lo, torch.zeros_like(lo))
    hi = torch.where(present, hi, torch.zeros_like(hi))
    return ((v - lo) / (hi - lo + eps)).masked_fill(~mask, 0.0)


def edge_map(image: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    r"""Edge map :math:`E = \mathrm{minmax}(|\nabla x|)^\gamma` of a ``B×1×H×W`` image.

    :math:`|\nabla x| = \sqrt{(x - \mathrm{shift}_H x)^2 + (x - \mathrm{shift}_W x)^2}` with forward
    differences; a difference counts only when both of its pixels are valid (so the border of the
    warped image is not an edge), and is 0 on the last row / column.
    """
    x = image.float()
    dh = torch.zeros_like(x)
    dw = torch.zeros_like(x)
    dh[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    dw[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    pair_h = torch.zeros_like(valid)
    pair_w = torch.zeros_like(valid)
    pair_h[..., :-1, :] = valid[..., 1:, :] & valid[..., :-1, :]
    pair_w[..., :, :-1] = valid[..., :, 1:] & valid[..., :, :-1]
    magnitude = torch.sqrt(dh.where(pair_h, 0.0).pow(2) + dw.where(pair_w, 0.0).pow(2))
    return masked_minmax(magnitude, valid).pow(gamma)


def uncertainty_map(q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    r"""Cluster uncertainty :math:`S = \mathrm{minmax}(-\sum_k q_k \log q_k)`, ``B×1×H×W``."""
    qf = q.float()
    entropy = -(qf * qf.clamp_min(1e-12).log()).sum(dim=1, keepdim=True)
    return masked_minmax(entropy, valid)


def local_ncc(
    s: torch.Tensor, e: torch.Tensor, valid: torch.Tensor, window: int, eps: float
) -> torch.Tensor:
    r"""Squared local normalised cross-correlation of two ``B×1×H×W`` maps.

    Window statistics are means over the valid pixels of a ``window×window`` neighbourhood
    (``avg_pool2d`` of masked maps divided by that of the mask):

    .. math::
        cc = \frac{\mathrm{cov}_w(S, E)^2}{\max(\mathrm{var}_w(S), \epsilon)\,
        \max(\mathrm{var}_w(E), \epsilon)}.

    Returns:
        ``B×1×H×W`` map of ``cc`` (meaningful at valid pixels).
    """
    m = valid.float()

    def window_mean(v: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(v * m, window, stride=1, padding=window // 2)

    count = window_mean(torch.ones_like(s)).clamp_min(1e-12)
    mean_s = window_mean(s) / count
    mean_e = window_mean(e) / count
    cov = window_mean(s * e) / count - mean_s * mean_e
    var_s = window_mean(s * s) / count - mean_s.pow(2)
    var_e = window_mean(e * e) / count - mean_e.pow(2)
    return cov.pow(2) / (var_s.clamp_min(eps) * var_e.clamp_min(eps))


class RegularisedIICLoss(nn.Module):
    r"""Regularised IIC loss (Peng et al., "Boundary-aware Information Maximization for
    Self-supervised Medical Image Segmentation").

    With :math:`P = \frac1N \sum_n p_n q_n^\top` over valid pixels, symmetrised, and marginals
    :math:`P_i, P_j`:

    .. math::
        L_{RMI} = -\sum_{ij} \Big[\alpha \frac{\delta_{ij}}{K} + (1 - \alpha) P_{ij}\Big]
        \log(P_{ij} + \epsilon) + \lambda \sum_{ij} P_{ij} (\log P_i + \log P_j).

    ``alpha=0, lam=1`` is plain IIC (:math:`-I`); larger ``alpha`` favours a balanced diagonal
    joint (corresponding pixels share a cluster, clusters are equally used). ``eps`` also guards
    the logs of the marginals (our choice). Computed in float32.

    Args:
        alpha: weight of the balanced-diagonal target.
        lam: :math:`\lambda`, weight of the marginal-entropy term.
        eps: :math:`\epsilon` inside the logs.

    Shapes:
        ``p``, ``q``: ``B×K×H×W`` probabilities (softmax over K). ``valid``: ``B×1×H×W`` bool.
        Output: scalar.
    """

    def __init__(self, alpha: float = 0.5, lam: float = 1.5, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.alpha = alpha
        self.lam = lam
        self.eps = eps

    def forward(self, p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        _check_maps(p, q, valid)
        return regularised_mi(joint_distribution(p, q, valid), self.alpha, self.lam, self.eps)


class BoundaryCrossCorrelationLoss(nn.Module):
    r"""Boundary-aware cross-correlation loss (Peng et al., "Boundary-aware Information
    Maximization for Self-supervised Medical Image Segmentation").

    Cluster uncertainty should sit on image edges. With the edge map
    :math:`E = \mathrm{minmax}(|\nabla x|)^\gamma` (forward differences) and the uncertainty
    :math:`S = \mathrm{minmax}(-\sum_k q_k \log q_k)`, both over valid pixels,

    .. math::
        cc = \frac{\mathrm{cov}_w(S, E)^2}{\mathrm{var}_w(S)\,\mathrm{var}_w(E)}, \qquad
        L_{CC} = -\operatorname{mean}_{\text{valid}}(cc),

    over ``window×window`` neighbourhoods, each variance clamped at ``eps``. Computed in float32.

    Args:
        gamma: edge exponent :math:`\gamma` (0.75 for MR, 0.5 for CT).
        window: odd side of the local window.
        eps: lower clamp of the local variances.

    Shapes:
        ``q``: ``B×K×H×W`` probabilities. ``image``: ``B×1×H×W`` image aligned with ``q``.
        ``valid``: ``B×1×H×W`` bool. Output: scalar.
    """

    def __init__(self, gamma: float = 0.75, window: int = 5, eps: float = 1e-5) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}.")
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be an odd integer >= 3, got {window}.")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.gamma = gamma
        self.window = window
        self.eps = eps

    def forward(self, q: torch.Tensor, image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        _check_maps(q, q, valid)
        expected = (q.shape[0], 1, *q.shape[2:])
        if tuple(image.shape) != expected:
            raise ValueError(f"image must have shape {expected}, got {tuple(image.shape)}.")
        s = uncertainty_map(q, valid)
        e = edge_map(image, valid, self.gamma)
        cc = local_ncc(s, e, valid, self.window, self.eps)
        return -cc[valid].mean()


class IICBoundaryLoss(nn.Module):
    r"""Objective 3 of segassist: :math:`L = w_{rmi} L_{RMI} + w_{cc} L_{CC}` (Peng et al.).

    :math:`L_{RMI}` is :class:`RegularisedIICLoss` of the two views; :math:`L_{CC}` is
    :class:`BoundaryCrossCorrelationLoss` averaged over ``p`` and ``q``, both compared with the
    transformed image ``W_A(x)`` they are aligned with.

    Args:
        w_rmi: weight of the regularised IIC term.
        w_cc: weight of the boundary cross-correlation term.
        alpha, lam, eps: see :class:`RegularisedIICLoss`.
        gamma, window, cc_eps: see :class:`BoundaryCrossCorrelationLoss`.

    Shapes:
        ``p``, ``q``: ``B×K×H×W`` probabilities; ``valid``, ``image``: ``B×1×H×W``. Output: scalar.
    """

    def __init__(
        self,
        w_rmi: float = 1.0,
        w_cc: float = 0.1,
        alpha: float = 0.5,
        lam: float = 1.5,
        eps: float = 1e-5,
        gamma: float = 0.75,
        window: int = 5,
        cc_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.w_rmi = w_rmi
        self.w_cc = w_cc
        self.rmi = RegularisedIICLoss(alpha=alpha, lam=lam, eps=eps)
        self.cc = BoundaryCrossCorrelationLoss(gamma=gamma, window=window, eps=cc_eps)

    def components(
        self, p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted ``(L_RMI, L_CC)``."""
        rmi = self.rmi(p, q, valid)
        cc = (self.cc(p, image, valid) + self.cc(q, image, valid)) / 2
        return rmi, cc

    def forward(
        self, p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        rmi, cc = self.components(p, q, valid, image)
        return self.w_rmi * rmi + self.w_cc * cc
