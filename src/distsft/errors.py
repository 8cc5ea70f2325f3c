"""The one exception a user's mistake becomes (the CLI turns it into one message and exit code 2)."""


class SpecError(Exception):
    """A user-caused problem with the spec, the data or the command line (exit code 2)."""
