"""How a test runs a command's main() on bad input: exit status 2, a `prog: error:` line, no traceback."""

from collections.abc import Callable, Sequence

import pytest


@pytest.fixture
def user_error(capsys) -> Callable[..., str]:
    """`user_error(main, argv)` -> the command's stderr, once it is shown to be a user error.

    `one_line=False` allows lines after the error line (a data file's bad rows are listed one per line).
    """

    def run(main: Callable[[Sequence[str]], object], argv: Sequence[str], *, one_line: bool = True) -> str:
        capsys.readouterr()  # what ran before belongs to someone else
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert [": error: " in line for line in lines[:1]] == [True], err
        assert not one_line or len(lines) == 1, err
        return err

    return run
