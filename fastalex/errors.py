"""The one exception type users see: fastalex.cli prints its message on one line, exit status 2.

Imports nothing. Raised for bad input (a missing or malformed source, a tampered pack, an impossible
option); a bug raises anything else and keeps its traceback.
"""


class UserError(Exception):
    """Bad input the user can fix; the message names the thing and, where there is one, the fix."""
