"""The one exception a user's mistake becomes (the CLI turns it into one message and exit code 2)."""


class SpecError(Exception):
    """A user-caused problem with the spec, the data or the command line (exit code 2)."""


class NotReachable(SpecError):
    """A hub model or dataset that is neither local nor in the cache while the hub cannot be reached:
    `plan` reports it as "not read" (exit 0) rather than as a mistake; `run` still exits 2."""
