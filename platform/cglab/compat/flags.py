"""Which optional CUDA libraries this process can import, as Megatron-Core's own HAVE_TE / HAVE_APEX flags say.

Found by module search, not by import: importing Transformer Engine initialises CUDA libraries, which a light
command (`cglab plan`) and a CPU machine should not pay for. Megatron imports them itself where it uses them.
"""

from __future__ import annotations

import importlib.util

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_APEX = importlib.util.find_spec("apex") is not None
