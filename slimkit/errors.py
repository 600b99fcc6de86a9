"""User-facing errors.

Every problem caused by the user's input (a missing file, an unknown model name, a checkpoint
that does not fit) is raised as :class:`SlimkitError` with a message that names the culprit.
The CLI prints such an error as one line and exits non-zero; anything else is a bug.
"""


class SlimkitError(Exception):
    """An error in the user's input, with a message fit to print as one line.

    Line breaks in the message (quoted from a file, a key, a foreign exception) are written as
    a visible ``\\n``, so the message is always one line whatever it quotes.
    """

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (args[0].replace("\r", "\\r").replace("\n", "\\n"), *args[1:])
        super().__init__(*args)


def first_line(e: BaseException) -> str:
    """``TypeName: first line of the message`` of a foreign exception, to quote inside a one-line SlimkitError."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
