"""Every error answer of our HTTP servers is JSON `{"error": "<sentence>"}`, never the raw input.

aiohttp answers requests its parser refuses (an over-long line, a control byte in a header, a bad
method or length) itself, before any middleware runs, as `text/plain` quoting part of the input.
`JsonErrorsRunner` serves an application with a request handler whose error answers are JSON
sentences chosen by the kind of error; `error_answer` is the same for errors a middleware catches.
"""

from __future__ import annotations

from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from gitfaas.metrics import json_error

# The parser's errors, from the most specific: what was wrong, never what was sent.
_SENTENCES: tuple[tuple[type[BaseException], str], ...] = (
    (http_exceptions.LineTooLong, "a line or header of the request is too long"),
    (http_exceptions.InvalidHeader, "a header of the request is not valid HTTP"),
    (http_exceptions.BadHttpMethod, "the request method is not valid HTTP"),
    (http_exceptions.InvalidURLError, "the request target is not a valid URL"),
    (http_exceptions.BadStatusLine, "the request line is not valid HTTP"),
    (http_exceptions.ContentLengthError, "the body does not match its Content-Length"),
    (http_exceptions.TransferEncodingError, "the chunked body is not valid"),
    (http_exceptions.PayloadEncodingError, "the body's encoding is not valid"),
    (http_exceptions.BadHttpMessage, "the request is not valid HTTP"),
)
_BY_STATUS = {400: "the request is not valid HTTP", 408: "the request took too long to arrive",
              413: "the request is too large", 431: "the request's headers are too large",
              500: "internal error", 503: "the service is unavailable", 504: "the request timed out"}


def sentence(status: int, exc: BaseException | None = None) -> str:
    for kind, text in _SENTENCES:
        if isinstance(exc, kind):
            return text
    return _BY_STATUS.get(status, "the request failed")


def error_answer(exc: BaseException) -> web.Response:
    """The JSON answer to an exception a handler raised that is not an `HTTPException`."""
    if isinstance(exc, http_exceptions.HttpProcessingError) and 400 <= (exc.code or 0) < 500:
        return json_error(exc.code, sentence(exc.code, exc))
    return json_error(500, sentence(500))


class _JsonErrorsHandler(RequestHandler):
    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own answer: it logs the error and refuses when a response has begun; ours replaces it.
        super().handle_error(request, status, exc, message)
        response = json_error(status, sentence(status, exc))
        response.force_close()
        return response


class _JsonErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorsRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer HTTP parser errors in JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer  # the same server; only how it makes connections changes
        return server
