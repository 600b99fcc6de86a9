"""User-facing errors.

Every problem caused by the user's input (a missing file, an unknown model name, a checkpoint
that does not fit) is raised as :class:`SlimkitError` with a message that names the culprit.
The CLI prints such an error as one line and exits non-zero; anything else is a bug.
"""


class SlimkitError(Exception):
    """An error in the user's input, with a message fit to print as one line."""
