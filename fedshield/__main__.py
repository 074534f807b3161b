"""``python -m fedshield`` is the ``fedshield`` command."""

from .cli import main

main()
