"""The API key: with `chatforge serve --api-key KEY` (or $CHATFORGE_API_KEY), every route answers 401 without it.

OpenAI's clients send the key as `Authorization: Bearer <key>`. A browser cannot add a header to the page it
navigates to, so the chat page and its files take the same key through HTTP Basic authentication (any user
name, the key as password): the 401 names both schemes, the browser asks for the key once and then sends it
with the page's own API calls, so the page needs no code of its own for it. Keys are compared in constant time.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets

from chatforge.serving.http_errors import error_body

REALM = "chatforge"


def presented_key(authorization: str) -> str | None:
    """The key an Authorization header carries: a Bearer token, or a Basic password."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


class RequireKey:
    """ASGI middleware: a request without `key` (Bearer, or Basic password) gets OpenAI's 401 error object."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        key = presented_key(authorization)
        if key is not None and secrets.compare_digest(key.encode("utf-8"), self.key):
            return await self.app(scope, receive, send)
        message = ("wrong API key" if authorization else "no API key") + (
            ": send `Authorization: Bearer <key>` (the key `chatforge serve` was started with)")
        body = error_body(401, message, None, "invalid_api_key")
        await _send_json(send, 401, body, [(b"www-authenticate", f'Bearer realm="{REALM}"'.encode()),
                                           (b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode())])


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})
