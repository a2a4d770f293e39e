"""Errors the command line reports to the user without a traceback."""


class UserError(Exception):
  """Bad input from the user: the CLI prints its message on one line and exits non-zero."""
