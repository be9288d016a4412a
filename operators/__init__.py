"""mmcurate operators, one class each, in folders by role.

Importing this package registers every built-in operator with :data:`operators.base.registry`.
"""

from operators import base  # noqa: F401
from operators.image import decode  # noqa: F401
from operators.filters import row_filters  # noqa: F401
from operators.models import caption, clip, heads  # noqa: F401
from operators.text import caption_quality, embed, language  # noqa: F401
