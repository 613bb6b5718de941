"""The browser annotator page: ``GET /`` and its static files under ``/web/``.

The page (``server/web/``: plain ES modules, no build step) and the niivue bundle it imports
(``server/web/vendor/niivue/``, vendored from npm by ``scripts/update_niivue.sh``) ship inside the
package: nothing is fetched from a CDN. The files hold no data, so they are served without a
token; the page sends the user's token with every API call it makes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["PAGE_PREFIX", "WEB_DIR", "install_page"]

WEB_DIR = Path(__file__).parent / "web"
"""The page's files (``index.html``, ``*.js``, ``style.css``, ``vendor/``)."""

PAGE_PREFIX = "/web"
"""URL prefix of the page's static files; apart from the MONAI Label routes at the root."""


def install_page(app: FastAPI) -> None:
    """Serve the annotator at ``/`` and its files under :data:`PAGE_PREFIX`."""
    index = WEB_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    def annotator_page() -> FileResponse:
        """The annotator (state in the query string: ``?dataset=<id>&image=<id>``)."""
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount(PAGE_PREFIX, StaticFiles(directory=WEB_DIR), name="web")
