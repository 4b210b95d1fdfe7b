"""Every name CoOp/CoCoOp takes from the rest of jaxprompt, imported in one place.

When the core moves, only these lines change.
"""
from __future__ import annotations

from jaxprompt import checkpoint as ckpt_lib  # noqa: F401
from jaxprompt import metrics as metrics_lib  # noqa: F401
from jaxprompt import optim  # noqa: F401
from jaxprompt import seeds  # noqa: F401
from jaxprompt import sharding as shd  # noqa: F401
from jaxprompt import tokenizer  # noqa: F401
from jaxprompt import trainer  # noqa: F401
from jaxprompt.convert.io import read_arrays  # noqa: F401
from jaxprompt import validate  # noqa: F401
from jaxprompt.data.files import list_images  # noqa: F401
from jaxprompt.data.loader import Loader, PaddedSequentialSampler, SequentialSampler  # noqa: F401
from jaxprompt.data.loader import ShuffleSampler  # noqa: F401
from jaxprompt.data.files import load_image  # noqa: F401
from jaxprompt.convert.openai_clip import load_clip  # noqa: F401
from jaxprompt.models.clip import CLIP, CLIPConfig  # noqa: F401
