"""``Allow`` on a 405 lists every method of the path, not only those of one of its routes.

Starlette answers a request whose path matches but whose method does not with the ``Allow`` of
the first route it tried; a path served by several routes (``GET`` and ``POST /api/v1/jobs``)
then advertises only one of them. RFC 9110 wants all of them, and clients and API checkers read
it.
"""

from __future__ import annotations

from fastapi.routing import iter_route_contexts
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AllowHeaderMiddleware", "allowed_methods"]


def allowed_methods(app: ASGIApp, path: str) -> list[str]:
    """The methods of the routes of ``app`` (included routers' too) whose template matches
    ``path`` most specifically (fewest parameters: ``…/{image_id}/stow`` over
    ``…/{image_id}/{filename}``), sorted."""
    by_parameters: dict[int, set[str]] = {}
    for route in iter_route_contexts(getattr(app, "routes", [])):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods = by_parameters.setdefault(str(route.path).count("{"), set())
            methods.update(route.methods or ())
    return sorted(by_parameters[min(by_parameters)]) if by_parameters else []


class AllowHeaderMiddleware:
    """Rewrite the ``Allow`` header of 405 answers with :func:`allowed_methods`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = allowed_methods(scope["app"], scope["path"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {
                    **message,
                    "headers": [*headers, (b"allow", ", ".join(methods).encode())],
                }
            await send(message)

        await self.app(scope, receive, send_with_allow)
