"""captioner: offline-first image and video captioning (Show, Attend and Tell).

The public API is what this module gives, for scripts and notebooks:

    from captioner import Captioner
    cap = Captioner.load()                      # the shipped model; Captioner.load(path, backend="torch")
    print(cap.caption([PIL.Image.open("photo.jpg")])[0].text)
    caption_shards(["shards/00000.tar"], "captions/", address="auto")   # on a Ray cluster: docs/scale.md

The parts, top to bottom (each may import only the parts below it; tests/test_layout.py checks): cli, app ->
training -> pipeline (the Captioner facade) -> runtime -> media -> model -> lite (the torch-free inference core), and
the shared leaves errors, options and cpu. docs/design.md draws them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Caption", "Captioner", "CaptionerError", "caption_shards", "__version__"]

if TYPE_CHECKING:
    from .errors import CaptionerError
    from .lite.caption import Caption
    from .pipeline.distributed import caption_shards
    from .pipeline.load import Captioner


def __getattr__(name: str) -> Any:
    """Imported on first use, so that `import captioner` (and the command's argument parsing) stays light."""
    if name == "Captioner":  # a bundle runs without torch; a checkpoint loads the torch engine (pipeline/load.py)
        from .pipeline.load import Captioner
        return Captioner
    if name == "Caption":
        from .lite.caption import Caption
        return Caption
    if name == "caption_shards":  # Ray Data over shards (docs/scale.md; needs captioner[ray] to run a job)
        from .pipeline.distributed import caption_shards
        return caption_shards
    if name == "CaptionerError":
        from .errors import CaptionerError
        return CaptionerError
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
