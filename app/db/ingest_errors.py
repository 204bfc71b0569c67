"""Which database errors are the data's (a refused value) and which the database's (unreachable, busy)."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc


def refused_for_data(exc: BaseException) -> bool:
    """The database refused a value (too long, NUL, not JSON) rather than failing as a whole."""
    if isinstance(exc, sa_exc.DataError | sa_exc.IntegrityError):
        return True
    return isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError)  # a bind it cannot send


def transient_database_error(exc: BaseException) -> bool | None:
    """True: the database was unreachable or busy (retry later); False: a database error that will not pass;
    None: not a database error."""
    if isinstance(exc, sa_exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True
    return None
