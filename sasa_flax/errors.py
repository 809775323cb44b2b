"""The base of every error meant for a person: bad config, data, devices or workdir."""


class UserError(ValueError):
    """Raised before anything is compiled or written; the message names what to change.

    Entry points print the message alone (no traceback) and exit non-zero.
    """
