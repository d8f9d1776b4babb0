"""The one error type users see: a single line that names what is wrong and how to fix it."""


class ChatforgeError(Exception):
    """A problem with the user's input, params or files; printed as one line, never a traceback."""
