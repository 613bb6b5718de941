"""One APIRouter per resource, mounted under ``/api/v1`` by :func:`segassist.server.main.create_app`."""

from __future__ import annotations
