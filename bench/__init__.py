"""The load benchmark: ``.venv/bin/python -m bench`` (see :mod:`bench.__main__`)."""
