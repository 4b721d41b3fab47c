"""Built-in method records, one paper a module; importing registers them."""

from regtune.families import common, cpr  # noqa: F401
