"""Error type for bad user-supplied data paths and files."""


class DataError(ValueError):
    """A data/tokenizer input problem the user can fix.

    Subclasses ValueError so callers may catch either; the message is one line naming the file,
    the command-line flag it came from and what to do.
    """
