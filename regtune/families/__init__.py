"""Built-in method records, one paper a module; importing registers them."""

from regtune.families import common, cpr  # noqa: F401
from regtune.families import implicit  # noqa: F401
from regtune.families import ire  # noqa: F401
