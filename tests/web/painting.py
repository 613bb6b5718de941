"""Paint a label slice onto the page's canvas with mouse events, as an annotator would.

Positions come from the image's affine, not from the page's own voxel bookkeeping: a voxel
``(i, j, k)`` of the image's grid → world millimetres (the NIfTI affine, read with nibabel) →
niivue's canvas position (``mm2frac``, ``frac2canvasPos``). What the page then uploads is therefore
checked independently of how it maps niivue's RAS drawing back to the image's grid.

A slice is painted as strokes of the pen (size 1) along rows: one stroke per run of voxels of
one class, along whichever in-plane axis needs fewer strokes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from playwright.sync_api import Page as Tab

__all__ = ["Stroke", "paint_slice", "slice_strokes"]

_MM_TO_PAGE = """(points) => {
  const nv = window.segassist.viewer.nv;
  const rect = nv.canvas.getBoundingClientRect();
  const dpr = nv.uiData.dpr || 1;
  return points.map((mm) => {
    const pos = nv.frac2canvasPos(nv.mm2frac(mm));
    return pos ? [rect.left + pos[0] / dpr, rect.top + pos[1] / dpr] : null;
  });
}"""


@dataclass(frozen=True)
class Stroke:
    """A pen stroke of class ``value`` from voxel ``start`` to voxel ``stop`` (image grid)."""

    value: int
    start: tuple[int, int, int]
    stop: tuple[int, int, int]


def _runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """``(row, first, last)`` of every run of True along the rows of a 2D mask."""
    found = []
    for row, line in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(np.int8), [0]])))
        found += [(row, int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return found


def slice_strokes(reference: np.ndarray, axis: int, index: int) -> list[Stroke]:
    """Strokes reproducing slice ``index`` along ``axis`` of ``reference`` exactly."""
    plane = np.take(reference, index, axis=axis)
    first, second = (a for a in range(3) if a != axis)
    strokes = []
    for value in sorted(int(v) for v in np.unique(plane) if v != 0):
        mask = plane == value
        along_rows = len(_runs(mask)) <= len(_runs(mask.T))
        for row, a, b in _runs(mask if along_rows else mask.T):
            ends = []
            for column in (a, b):
                voxel = [0, 0, 0]
                voxel[axis] = index
                if along_rows:
                    voxel[first], voxel[second] = row, column
                else:
                    voxel[first], voxel[second] = column, row
                ends.append((voxel[0], voxel[1], voxel[2]))
            strokes.append(Stroke(value, ends[0], ends[1]))
    return strokes


_STROKES = """(strokes) => {
  const canvas = window.segassist.viewer.nv.canvas;
  const fire = (type, [x, y]) => canvas.dispatchEvent(new MouseEvent(type, {
    clientX: x, clientY: y, button: 0, buttons: type === "mouseup" ? 0 : 1, bubbles: true,
  }));
  for (const [start, stop] of strokes) {
    fire("mousedown", start);
    // niivue draws on a move: a one-voxel stroke still moves, within the voxel
    fire("mousemove", stop[0] === start[0] && stop[1] === start[1] ? [stop[0] + 1, stop[1]] : stop);
    fire("mouseup", stop);
  }
}"""


def paint_slice(tab: Tab, reference: np.ndarray, affine: np.ndarray, axis: int, index: int) -> int:
    """Show slice ``index`` and paint it from ``reference`` with the page's pen; returns the
    number of strokes.

    Class and tool are chosen by clicking the page's buttons; the strokes are mouse events
    dispatched on the canvas, one class at a time, through niivue's own mouse handlers. (Each
    input event Playwright sends waits for a frame, and a software WebGL frame costs 0.1–0.5 s
    on a shared 2-core machine: ~180 strokes of real input took minutes.)
    """
    tab.evaluate("([axis, index]) => window.segassist.viewer.showSlice(axis, index)", [axis, index])
    tab.click("[data-tool=pen]")
    strokes = slice_strokes(reference, axis, index)
    ends = [end for s in strokes for end in (s.start, s.stop)]
    world = [(affine @ np.array([*voxel, 1.0]))[:3].tolist() for voxel in ends]
    positions = tab.evaluate(_MM_TO_PAGE, world)
    if any(p is None for p in positions):
        raise AssertionError(f"slice {index} along axis {axis} is not on the canvas")
    for value in sorted({s.value for s in strokes}):
        tab.click(f"[data-class-value='{value}']")
        tab.evaluate(
            _STROKES,
            [
                [start, stop]
                for stroke, start, stop in zip(
                    strokes, positions[::2], positions[1::2], strict=True
                )
                if stroke.value == value
            ],
        )
    return len(strokes)
