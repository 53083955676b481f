"""The one exception type that means: the user's input is wrong, and here is what to do."""


class InputError(ValueError):
    """Bad input. The message is one line naming the problem and what to do about it."""
