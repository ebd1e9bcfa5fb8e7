"""How the HTTP server runs the app: the access log (route templates, never paths), header limits, and requests the
HTTP parser rejects answered and logged without echoing a byte of them (they can hold NHS numbers and tokens)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from cpis_bridge.web.common import REQUEST_ID, ROUTE, TRACE_ID, problem

# Room for a long bearer token, so that auth answers it (401 problem+json) rather than the parser (a bare 400);
# auth refuses tokens far shorter than this before decoding them.
MAX_FIELD_SIZE = 128 * 1024
HANDLER_ARGS: dict[str, Any] = {"max_field_size": MAX_FIELD_SIZE}

log = logging.getLogger("cpis_bridge.http")


class AccessLogger(AbstractAccessLogger):
    """One line per request with the route template, never the raw path or query (they can hold NHS numbers)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # A request the parser rejected never went through the middleware: it has no route, ids or principal.
        extra: dict[str, Any] = {
            "method": request.method,
            "route": request.get(ROUTE, "unmatched"),
            "status": response.status,
            "durationMs": round(time * 1000, 2),
            "remote": request.remote,
        }
        # The access log runs after the request context is gone: take its ids from the request itself.
        if request.get(REQUEST_ID):
            extra["requestId"] = request[REQUEST_ID]
        if request.get(TRACE_ID):
            extra["traceId"] = request[TRACE_ID]
        self.logger.info("http.request", extra=extra)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class _QuietRequestHandler(RequestHandler):
    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's own version logs the exception (whose text quotes the raw request line or header) and answers
        it as text/plain; here only the kind of error is logged and answered."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; no error response can follow")
        if isinstance(exc, LineTooLong):
            status, title, detail = 431, "Request header fields too large", "a request line or header is too long"
        elif status == 500:
            title, detail = "Internal error", "an internal error occurred"
        else:
            title, detail = "Bad request", "the request is not valid HTTP"
        log.warning("http.rejected", extra={"status": status, "error": type(exc).__name__ if exc else None})
        response = problem(status, title, detail)
        response.force_close()
        return response


class _QuietServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose connections answer parse errors with problem+json and log no part of them."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _QuietServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
