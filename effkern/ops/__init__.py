"""effkern's public ops. Each is a typed function over a ``torch.ops.effkern.*`` custom op
declared in the op registry (effkern/_registry.py): fake impl for torch.compile, autograd, and
backend dispatch (cuda / triton / torch reference). Each family module lists its public names in
``__all__``; importing it registers its ops."""

from effkern.ops import binary_hash, integer, shift, tokens
from effkern.ops.binary_hash import *  # noqa: F401,F403
from effkern.ops.integer import *  # noqa: F401,F403
from effkern.ops.shift import *  # noqa: F401,F403
from effkern.ops.sparse24 import *  # noqa: F401,F403
from effkern.ops.sparse24 import __all__ as _sparse24_all
from effkern.ops.tokens import *  # noqa: F401,F403

__all__ = sorted(binary_hash.__all__ + integer.__all__ + shift.__all__ + tokens.__all__)
__all__ = sorted(__all__ + _sparse24_all)
