"""The base of every user-facing error of the toolkit; `dqa` prints these as one line, exit 2."""


class UserError(ValueError):
    """Bad input from the user (arguments, files, names), as opposed to a bug."""


USER_ERRORS = (UserError, FileNotFoundError)
