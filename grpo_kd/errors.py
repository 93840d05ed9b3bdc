"""The one exception type that means "the user gave bad input".

Everything raised as `GrpoKdError` is caught by the command line and printed as a single line, with a non-zero
exit code. Anything else that escapes is a bug and keeps its traceback — except the few errors of the machine
(a full disk, a read-only file system), which `describe_os_error` turns into one line too.
"""

from __future__ import annotations

import errno


class GrpoKdError(Exception):
    """Bad input, a missing file, a mismatched cache: a problem the user can fix, said in one line."""


# Errors of the machine rather than of the code: a full disk or quota, a read-only or failing file system, a
# permission. They become one line (`describe_os_error`); any other OSError is a bug and keeps its traceback.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "the file system is read-only", errno.EIO: "an input/output error of the device",
                      errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def describe_os_error(exc: BaseException) -> str | None:
    """One line for an OSError the user must fix on the machine (see ENVIRONMENT_ERRNOS), else None."""
    if not isinstance(exc, OSError) or exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{ENVIRONMENT_ERRNOS[exc.errno]}{where}"

