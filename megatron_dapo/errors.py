"""Input a user can fix, and the one way every command reports it: a line naming the field or file and the
fix, on stderr, and exit status 2 (argparse's status for a bad command line), never a traceback."""

import contextlib
import sys
from collections.abc import Iterator


class UserError(ValueError):
    """A config value, data file or checkpoint that cannot work; the message names it and what to change."""


# Errors whose message already names what to change: user input, or a path the user gave that is missing,
# present already, or of the wrong kind.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)


def error_message(error: BaseException) -> str:
    """The error's own words: a KeyError's str() would quote its message."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


@contextlib.contextmanager
def exit_on_user_error(prog: str, *more: type[BaseException]) -> Iterator[None]:
    """Run a command's body; USER_ERRORS (and `more`, the command's own) end it with `prog: error: message`
    and exit status 2. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except (*USER_ERRORS, *more) as error:
        print(f"{prog}: error: {error_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
