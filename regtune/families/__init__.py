"""Built-in method records, one paper a module plus the cross-paper compositions; importing registers them."""

from regtune.families import (  # noqa: F401
    common,
    composed,
    cpr,
    implicit,
    ire,
)
