"""The one exception type that means "the user gave bad input".

Everything raised as `GrpoKdError` is caught by the command line and printed as a single line, with a non-zero
exit code. Anything else that escapes is a bug and keeps its traceback.
"""


class GrpoKdError(Exception):
    """Bad input, a missing file, a mismatched cache: a problem the user can fix, said in one line."""

