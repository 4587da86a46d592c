"""How a test runs a command's main() on bad input: exit status 2, a `prog: error:` line, no traceback."""

from collections.abc import Callable, Sequence

import pytest


@pytest.fixture
def user_error(capsys) -> Callable[..., str]:
    """`user_error(main, argv)` -> the command's error line, once it is shown to be a user error.

    Only argparse's usage may come before it. `one_line=False` allows lines after it (a data file's bad
    rows are listed one per line) and returns them too.
    """

    def run(main: Callable[[Sequence[str]], object], argv: Sequence[str], *, one_line: bool = True) -> str:
        capsys.readouterr()  # what ran before belongs to someone else
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        at = next((i for i, line in enumerate(lines) if ": error: " in line), None)
        assert at is not None, err
        assert all(line.startswith(("usage:", " ")) for line in lines[:at]), err  # argparse's usage
        assert not one_line or at == len(lines) - 1, err
        return "\n".join(lines[at:])

    return run
