"""The built-in trained demo models: diffusers folders shipped inside the package (training/train_demo.py).

`demo` is a small Stable Diffusion-architecture model (AutoencoderKL, CLIPTextModel with the real
CLIP tokenizer, UNet2DConditionModel with cross-attention, epsilon prediction, the SD noise schedule)
trained on LatentRT's procedural scenes (`latentrt.scenes`); `demo-turbo` is its few-step student.
Both are plain diffusers folders, loaded by the same code as any user checkpoint.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from latentrt.errors import CheckpointError

DEMO_MODELS = ("demo-turbo", "demo")  # the default first
WEIGHTS = "demo_weights"


def demo_folder(name: str) -> Path:
    """The shipped diffusers folder of a demo model ('demo' or 'demo-turbo')."""
    if name not in DEMO_MODELS:
        raise CheckpointError(f"unknown demo model {name!r}; built-in demo models: {', '.join(DEMO_MODELS)}")
    folder = Path(str(resources.files("latentrt.reference").joinpath(WEIGHTS, name)))
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"the demo model {name!r} is missing from this installation ({folder}); "
                              "reinstall latentrt")
    return (folder / "model_index.json").resolve().parent  # an editable install links the files from the source tree
