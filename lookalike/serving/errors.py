"""The one convention between the model code and its clients: a `RequestError` is the client's fault.

The adapter (`lookalike.serving.adapter`) answers a request whose parsing or computation raises a
`RequestError` with INVALID_ARGUMENT (HTTP 400) and the error's message, for that request alone; the other
requests of its dynamic batch are answered as if it had not been there. Anything else raised for a request
is the server's fault: an internal error, logged, with the same isolation. So a new check on client input
raises a `RequestError` (or one of its subclasses: `ImageError`, `UnknownProductError`), never a bare
ValueError, which would tell the client the server failed.

It subclasses ValueError, so code that validated with ValueError before still catches it.
"""


class RequestError(ValueError):
    """A request the server refuses because of what the client sent (INVALID_ARGUMENT, with this message)."""
