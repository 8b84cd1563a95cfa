"""The one exception type users see.

Every check on user input (files, fields, shapes, token ids, artifacts) raises `MoetrtError` with a
one-line message naming the file or field and what was expected; the CLI prints it as `error: ...` and
exits with status 2 instead of showing a traceback from deep inside a library.
"""


class MoetrtError(Exception):
    """A user-facing error: the message is one line that names the culprit and the expectation."""
