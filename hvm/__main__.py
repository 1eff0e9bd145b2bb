"""`python -m hvm` and the `hvm` console script (pyproject.toml points it here)."""
import gc

# hvm's start-up creates a few hundred thousand long-lived objects (modules, classes, functions): the cyclic
# collector would walk them again and again while they are imported (4-8 ms of a ~50 ms `hvm run`).
# entry_point() freezes them and turns the collector back on before anything runs.
gc.disable()

from hvm.cli import entry_point  # noqa: E402  (after gc.disable, on purpose)

if __name__ == "__main__":
    entry_point()
