"""The browser page against a live embedded service, in Debian's headless Chromium.

Playwright for Python drives the system browser (``/usr/bin/chromium``, ``.ci/run`` installs it;
``SEGASSIST_TEST_CHROMIUM`` names another), so no browser is downloaded. WebGL runs in software
(SwiftShader through ANGLE). Every test saves a screenshot of each step under
``tests/web/artifacts/<test>/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from playwright.sync_api import Browser, sync_playwright
from playwright.sync_api import Page as Tab
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.client.conftest import Service, running_service
from tests.conftest import unavailable

ARTIFACTS = Path(__file__).parent / "artifacts"

BROWSER_ARGS = [
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    # Input events wait for a frame; without vsync a software frame is not held back further.
    "--disable-gpu-vsync",
    "--disable-frame-rate-limit",
]

VIEWPORT = {"width": 1280, "height": 800}

PAGE_TIMEOUT_MS = 120_000
"""Bounds a hung step (the machine is shared); not a performance claim."""
SCREENSHOT_TIMEOUT_MS = 30_000
"""How long a screenshot (an artifact, not a check) may wait for a frame."""

DRAW_QUEUED_FRAMES = """() => {
  const gl = window.segassist?.viewer?.nv?.gl;
  if (gl) gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, new Uint8Array(4));
}"""
"""Wait until the GPU process has drawn every WebGL frame the page queued (a one-pixel read
cannot return before them). The painting helper dispatches a slice's strokes in one go and
niivue draws on each mouse event: 52 strokes queued 30.6 s of software-rendered frames, during
which every screenshot timed out (the renderer's own ``requestAnimationFrame`` still ran within
0.1 s); after the read, the screenshot took 0.2 s."""


@pytest.fixture(scope="module")
def web_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``segassist serve`` on a free port with a short first pretraining and none after."""
    data_dir = tmp_path_factory.mktemp("segassist-web")
    yield from running_service(data_dir, pretrain_steps=8)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Debian's Chromium under Playwright (skipped, or failed under CI, when absent)."""
    executable = os.environ.get("SEGASSIST_TEST_CHROMIUM") or shutil.which("chromium")
    if executable is None:
        unavailable("chromium not installed (apt-get install chromium)")
        return
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield browser
        browser.close()


@dataclass
class Page:
    """A browser tab on the page, with the messages it logged and a screenshot per step."""

    tab: Tab
    url: str
    folder: Path
    errors: list[str] = field(default_factory=list)
    shots: int = 0
    timed_out: str | None = None

    def shot(self, step: str) -> None:
        """Save a screenshot of the page as ``<nn>-<step>.png`` for people to look at.

        A screenshot waits for a frame of the software-rendered canvas, which on a starved
        machine took over 120 s (it is taken once the queued frames are drawn,
        :data:`DRAW_QUEUED_FRAMES`); the steps' checks are the assertions, so a screenshot that
        times out is written down (``<nn>-<step>.missing``, and a warning) instead of failing.
        Once one has timed out, the tab's later screenshots are written down as skipped: a
        renderer that stopped producing frames did so for every step of a test (9 × 30 s).
        """
        self.shots += 1
        path = self.folder / f"{self.shots:02d}-{step}.png"
        if self.timed_out is not None:
            path.with_suffix(".missing").write_text(f"skipped: {self.timed_out} timed out\n")
            return
        try:
            self.tab.evaluate(DRAW_QUEUED_FRAMES)
            self.tab.screenshot(path=str(path), timeout=SCREENSHOT_TIMEOUT_MS)
        except PlaywrightTimeoutError as exc:
            self.timed_out = path.name
            path.with_suffix(".missing").write_text(f"{exc}\n")
            warnings.warn(f"screenshot {path.name} timed out", stacklevel=2)


@pytest.fixture
def page(chromium: Browser, web_service: Service, request: pytest.FixtureRequest) -> Iterator[Page]:
    folder = ARTIFACTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    context = chromium.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    tab = context.new_page()
    opened = Page(tab, web_service.url, folder)
    tab.on("pageerror", lambda err: opened.errors.append(str(err)))
    yield opened
    context.close()


@dataclass(frozen=True)
class SpineCT:
    """TPTBox's sample CT and its reference labels (``segassist.models.datasets``, tptbox-spine)."""

    image: Path
    reference: np.ndarray
    affine: np.ndarray
    axis: int
    classes: dict[int, str]


@pytest.fixture(scope="session")
def spine_ct() -> SpineCT:
    from segassist.models.datasets import load_set

    case = next(c for c in load_set("tptbox-spine") if c.modality == "CT")
    reference = nib.load(str(case.label))
    return SpineCT(
        image=case.image,
        reference=np.asarray(reference.dataobj).astype(np.uint8),  # type: ignore[attr-defined]
        affine=np.asarray(reference.affine),  # type: ignore[attr-defined]
        axis=case.axis,
        classes=dict(case.classes),
    )
