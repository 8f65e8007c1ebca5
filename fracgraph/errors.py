"""One exception type for every user-facing failure, so the CLI can print one line and exit 2."""


class FracgraphError(Exception):
    """A problem with the user's input or environment: message says what is wrong and how to fix it."""

    exit_code = 2
