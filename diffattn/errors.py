"""The error and warning types diffattn raises for its users.

* :class:`UserError` (a ``ValueError``): every bad input a user can give, from a wrong tensor
  shape to an unknown preset name. Its message names the argument, the value and what is
  allowed; where there are several reasons it lists every one (one per line). The CLI prints
  the whole message and exits 2. Any other exception is a bug in diffattn and keeps its
  traceback.
* :class:`DenseFallbackWarning`: a call that was asked to run sparse ran the stock dense
  attention instead (with the reason). ``SparsityConfig(on_unsupported="raise")`` turns these
  into :class:`UserError`.

Example:
    >>> from diffattn.errors import UserError
    >>> try:
    ...     raise UserError("block_size=48 is not supported; allowed: 32, 64, 128")
    ... except ValueError as error:  # a UserError is a ValueError
    ...     print(error)
    block_size=48 is not supported; allowed: 32, 64, 128
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input from the user: the message names the value and what is allowed."""


class DenseFallbackWarning(UserWarning):
    """A call that was asked to run sparse ran the stock dense attention instead; the message
    says why (issued once per reason and installed transformer)."""


def error_message(error: BaseException) -> str:
    """An exception's message for a user, or its type's name when it has none.

    Example:
        >>> error_message(OSError("disk full")), error_message(KeyError())
        ('disk full', 'KeyError')
    """
    return str(error).strip() or type(error).__name__


__all__ = ["DenseFallbackWarning", "UserError", "error_message"]
