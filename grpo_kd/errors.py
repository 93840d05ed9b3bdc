"""The one exception type that means "the user gave bad input".

Everything raised as `GrpoKdError` is caught by the command line and printed as a single line, with a non-zero
exit code. Anything else that escapes is a bug and keeps its traceback — except the few errors of the machine
(a full disk, a read-only file system), which `describe_os_error` turns into one line too.
"""

from __future__ import annotations

import errno
import re


class GrpoKdError(Exception):
    """Bad input, a missing file, a mismatched cache: a problem the user can fix, said in one line."""


# Errors of the machine rather than of the code: a full disk or quota, a read-only or failing file system, a
# permission. They become one line (`describe_os_error`); any other OSError is a bug and keeps its traceback.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "the file system is read-only", errno.EIO: "an input/output error of the device",
                      errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def describe_os_error(exc: BaseException) -> str | None:
    """One line for an error of the machine the user must fix (see ENVIRONMENT_ERRNOS), else None: an OSError, or
    a library's own exception around one (safetensors reports a full disk as "... (os error 28)")."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        match = re.search(r"os error (\d+)\)", str(exc))
        code = int(match.group(1)) if match else None
    if code not in ENVIRONMENT_ERRNOS:
        return None
    filename = getattr(exc, "filename", None)
    return ENVIRONMENT_ERRNOS[code] + (f" ({filename})" if filename else "")

