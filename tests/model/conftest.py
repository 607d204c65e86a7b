"""Model tests run tiny models whose ops are too small to gain from a second thread; one thread keeps
them fast and steady when the two CI cores are shared. Scoped to this folder's tests (restored after).
`fails` runs a command line that must stop with an error."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fails(capsys):
    """fails(main, argv) runs a command line's `main(argv)`, which must stop with a nonzero exit
    status; returns what it said (stderr, then its exit message)."""

    def run(main, argv: list[str]) -> str:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code not in (0, None)
        return f"{capsys.readouterr().err}\n{info.value.code}"

    return run
