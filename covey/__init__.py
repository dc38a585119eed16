"""covey: a federated, privacy-first framework for on-device AI assistants.

The top-level package is the thin front door: the version and the exception root.
Each domain lives in its own subpackage (``covey.device``, ``covey.privacy``, ...).
"""

from covey.errors import CoveyError

__version__ = "0.1.0"

__all__ = ["CoveyError", "__version__"]
