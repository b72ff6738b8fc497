"""Bad requests as MONAI Label exceptions, and their translation to HTTP answers.

MONAI Label 0.8.5 registers no handler for its own exceptions: an unknown model or a bad
input reaches the client as "500 Internal Server Error". Tasks here raise `InvalidInput`
(a ``MONAILabelException`` with error INVALID_INPUT, so it stays meaningful outside HTTP,
e.g. in ``monailabel.interfaces.utils.app``), and the app converts every MONAI Label
exception into FastAPI's ``HTTPException`` with the status below and the message as detail.
`monailabel_exception_handler` does the same for the ones raised where the app has no hook
(an unknown active-learning strategy, an unknown image in upstream code).
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)

# Status for MONAI Label's own error types when no explicit status was attached.
_STATUS = {
    MONAILabelError.INVALID_INPUT: 400,
}


class InvalidInput(MONAILabelException):
    """A request the client must change: the server answers ``status`` with ``message``.

    Arguments:
      message: what is wrong and, where possible, what to send instead.
      status: 400 bad parameter, 404 unknown model or image, 409 nothing to train on,
        415 unsupported file type, 422 unreadable file.
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(MONAILabelError.INVALID_INPUT, message)
        self.status = status

    def __str__(self) -> str:
        return self.msg


def http_status(error: MONAILabelException) -> int:
    """The HTTP status for a MONAI Label exception: 4xx for input errors, else 500."""
    if isinstance(error, (ImageNotFoundException, LabelNotFoundException)):
        return 404
    return getattr(error, "status", None) or _STATUS.get(error.error, 500)


def http_error(error: MONAILabelException) -> HTTPException:
    """The HTTP answer for a MONAI Label exception, its message as the detail."""
    return HTTPException(status_code=http_status(error), detail=str(error.msg))


async def monailabel_exception_handler(request, error: MONAILabelException) -> JSONResponse:
    """FastAPI exception handler: a MONAI Label exception as ``{"detail": message}``."""
    return JSONResponse({"detail": str(error.msg)}, status_code=http_status(error))
