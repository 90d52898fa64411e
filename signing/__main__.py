"""``python -m signing``: see :mod:`signing.cli`."""

from signing.cli import main

main()
