"""Built-in method records, one paper a module; importing registers them."""

from regtune.families import (  # noqa: F401
    common,
    cpr,
    implicit,  # noqa: F401
    ire,  # noqa: F401
)
