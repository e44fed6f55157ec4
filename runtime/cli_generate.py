"""`latentrt generate DIR --prompt ... -o out.png`: engines -> images, with a progress bar and a timing table.

Families without a text encoder take no prompt; their inputs come from `--condition NAME=VALUE`
(e.g. `--condition class_labels=3`, one value per image with `class_labels=3,7`), passed to the
pipeline as `GenerationRequest.conditioning` and recorded in the PNG metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from latentrt.choices import Backend, values
from latentrt.families import SamplerId

from .condition_values import is_condition_value

SAMPLERS = tuple(s.value for s in SamplerId)  # each maps to a diffusers scheduler class (runtime/scheduler_config.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="engine folder (`latentrt build`), ONNX export (`latentrt "
                                                      "export`), or with --backend torch a checkpoint (folder, .safetensors "
                                                      "file with --config, tiny:<family>)")
    parser.add_argument("-p", "--prompt", help="what to draw (needed by every family with a text encoder)")
    parser.add_argument("-n", "--negative-prompt", help="what to avoid (SDXL: none = zero embeddings)")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write; several images -> out-0.png, ...")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's, e.g. 30; Turbo 1)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (<= 1: off; Turbo 0)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                        help="rescale the guided prediction's std toward the conditional one, in [0, 1] (Lin et al. "
                             "2023; 0.7 with zero-SNR / v-prediction models; default 0: off)")
    parser.add_argument("--prompt-weighting", action="store_true",
                        help="read A1111-style emphasis in prompts: (word) x1.1, [word] /1.1, (word:1.3); "
                             "\\( for a literal bracket")
    parser.add_argument("--sampler", choices=SAMPLERS, metavar="NAME",
                        help=f"default: the checkpoint's own scheduler (scheduler_config.json); one of "
                             f"{', '.join(SAMPLERS)}")
    parser.add_argument("--width", type=int, help="pixels, a multiple of 64 (with --height; default: the checkpoint's "
                                                  "native size, UNet sample_size x VAE factor)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 64 (with --width)")
    parser.add_argument("--aspect", help="aspect ratio W:H, e.g. 16:9: snaps to the nearest bucket around the "
                                            "checkpoint's native size")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--condition", type=condition, action="append", default=[], metavar="NAME=VALUE",
                        help="a conditioning value other than text, e.g. class_labels=3 (class-conditional "
                             "models), depth_map=depth.png|.npy (depth-to-image), noise_level=20 (x4 upscaler), "
                             "encoder_hidden_states=boxes.npy (token sequences: (tokens, width) or (slots, tokens, "
                             "width)); VALUE: a number, a comma-separated list (one per image slot), JSON, or a "
                             ".png/.npy file read by the input's provider; negative_NAME=VALUE sets the unconditional half of guidance; repeatable")
    parser.add_argument("--batch", type=int, default=1,
                        help="prompts per batch (the prompt, or without one each --condition value, repeated)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--image", help="init image (img2img, inpainting); the image to vary (sd2-unclip)")
    parser.add_argument("--strength", type=float, help="img2img strength in (0, 1] (default 0.8; inpainting 1.0)")
    parser.add_argument("--mask", help="inpainting mask (white = repaint), same size as --image")
    parser.add_argument("--step-cache", type=int, default=1, metavar="N",
                        help="DeepCache (arXiv:2312.00858): a full UNet pass every N steps, the shallow part on its "
                             "cached deep feature in between (engines from `latentrt export --step-cache`, or "
                             "--backend torch); default 1: off")
    parser.add_argument("--tiny-vae", action="store_true",
                        help="decode with the tiny VAE decoder (TAESD) added by `latentrt export --tiny-vae`: "
                             "faster, slightly softer images")
    parser.add_argument("--refiner", metavar="DIR", help="SDXL refiner engines: the base hands over its latents")
    parser.add_argument("--denoising-end", type=float,
                        help="with --refiner: fraction of the schedule the base runs before the refiner (default 0.8)")
    parser.add_argument("--tile", type=int, metavar="PX",
                        help="image-conditioned models (x4 upscaler): upscale --image in overlapping tiles of PX x PX "
                             "input pixels, blended linearly over the overlap (latentrt.runtime.tiles)")
    parser.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                        help="with --tile: input pixels adjacent tiles share (default: a quarter of --tile)")
    parser.add_argument("--backend", choices=values(Backend), help="default: what DIR was built for")
    parser.add_argument("--config", help="with --backend torch and a single .safetensors file: a local diffusers "
                                         "folder of the same family whose configs and tokenizers describe it, or "
                                         "a hub id (as `latentrt export --config`)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _number(text: str) -> int | float:
    """An int, else a float, from one --condition item; ValueError otherwise."""
    try:
        return int(text)
    except ValueError:
        return float(text)


MAP_FILES = (".png", ".npy")  # --condition NAME=FILE: a map input (depth_map=depth.png), read by its provider


def condition(text: str) -> tuple[str, int | float | list[int | float] | str]:
    """An argparse type: NAME=VALUE with VALUE a number, a comma-separated list of numbers or JSON of those,
    or a .png/.npy file path for a map input (depth maps, semantic maps)."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    if not sep or not name.isidentifier() or not raw:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. class_labels=3)")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = [_number(item.strip()) for item in raw.split(",")] if "," in raw else _number(raw)
        except ValueError:
            value = raw
    if isinstance(value, str) and value.lower().endswith(MAP_FILES):  # issue 12 (H3): a map input's file
        return name, value
    if not is_condition_value(value):
        raise argparse.ArgumentTypeError(f"{name}={raw[:60]!r}: VALUE must be a number, a comma-separated list of "
                                         "numbers (e.g. 3,7), a JSON list of numbers or a .png/.npy map file")
    return name, value


def conditioning_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The --condition values by name; --batch N repeats each single value N times, as it repeats the prompt."""
    from latentrt.errors import InvalidRequest

    given: dict[str, Any] = {}
    for name, value in args.condition:
        if name in given:
            raise InvalidRequest(f"--condition {name} is given twice; give it once (a list: {name}=3,7)")
        given[name] = value
    if args.batch > 1 and args.prompt is None and not given:
        raise InvalidRequest(f"--batch {args.batch} repeats the prompt, but none is given: add -p/--prompt, or "
                             "--condition values for a model without a text encoder")
    if args.batch == 1:
        return given
    for name, value in given.items():
        if isinstance(value, list) and len(value) != args.batch:
            raise InvalidRequest(f"--batch {args.batch} but --condition {name} holds {len(value)} values; give one "
                                 f"value, or {args.batch}, or drop --batch")
    return {name: value if isinstance(value, list) else [value] * args.batch for name, value in given.items()}


def output_paths(output: str | Path, count: int) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png, ... for several."""
    out = Path(output)
    if out.suffix.lower() != ".png" and out.name:
        out = out.with_name(out.name + ".png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


class StepBar:
    """A tqdm bar over denoising steps; a new bar for each stage (base, refiner)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None
        self.stage = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or done == 1:
            self.close()
            self.stage += 1
            self.bar = tqdm(total=total, desc="denoise" if self.stage == 1 else "refine", unit="step", file=sys.stderr,
                            leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def checked_output_paths(output: str, count: int) -> list[Path]:
    """The PNG paths for `count` images, each checked writable before any work (nothing is created)."""
    from latentrt.errors import InvalidRequest
    from latentrt.runtime.images import check_output_file

    given = Path(output)
    if not output.strip() or not given.name:
        raise InvalidRequest(f"-o {output!r} names no file; give e.g. -o out.png")
    if given.suffix and given.suffix.lower() != ".png":
        raise InvalidRequest(f"-o {output!r}: LatentRT writes PNG files; name it {given.stem}.png")
    if os.path.lexists(given) and not given.is_file():
        raise InvalidRequest(f"-o {output!r} is {'a folder' if given.is_dir() else 'not a regular file'}; name a "
                             f".png file (e.g. {given / 'out.png' if given.is_dir() else 'out.png'})")
    return [check_output_file(p) for p in output_paths(output, count)]


def request_from_args(args: argparse.Namespace) -> Any:
    from latentrt.errors import InvalidRequest
    from latentrt.runtime.request import GenerationRequest

    if args.batch < 1:
        raise InvalidRequest(f"--batch must be >= 1, got {args.batch}")
    if args.num_images < 1:
        raise InvalidRequest(f"--num-images must be >= 1, got {args.num_images}")
    if args.denoising_end is not None and not args.refiner:
        raise InvalidRequest("--denoising-end sets where the base hands over to --refiner; without a refiner the "
                             "image would be left partly denoised: add --refiner DIR or drop --denoising-end")
    if args.tile_overlap is not None and args.tile is None:
        raise InvalidRequest("--tile-overlap sets how much the tiles of --tile share: add --tile PX")
    conditioning = conditioning_from_args(args)
    prompt = args.prompt if args.prompt is None or args.batch == 1 else [args.prompt] * args.batch
    return GenerationRequest(
        prompt=prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        sampler=args.sampler, width=args.width, height=args.height, aspect=args.aspect, seed=args.seed,
        num_images_per_prompt=args.num_images, image=args.image, strength=args.strength, mask=args.mask,
        denoising_end=args.denoising_end, guidance_rescale=args.guidance_rescale,
        prompt_weighting=args.prompt_weighting, conditioning=conditioning, step_cache=args.step_cache,
        tiny_vae=args.tiny_vae)


def check_prompt_given(args: argparse.Namespace, spec: Any) -> None:
    """InvalidRequest naming -p/--prompt when a family conditioned on text gets none."""
    from latentrt.errors import InvalidRequest

    if args.prompt is None and spec.text_encoders and spec.image_encoder is None:  # issue 12: unCLIP takes ""
        raise InvalidRequest(f"{spec.name} is conditioned on text: give a prompt with -p/--prompt")


def run(args: argparse.Namespace) -> int:
    from latentrt.runtime.images import save_png
    from latentrt.runtime.pipeline import load_pipeline
    from latentrt.runtime.timing import format_table

    request = request_from_args(args)
    checked_output_paths(args.output, args.batch * args.num_images)  # before the work, not after it
    pipe = load_pipeline(args.folder, backend=args.backend, device=args.device, refiner=args.refiner,
                         config=args.config)
    bar = StepBar(args.progress)
    try:
        check_prompt_given(args, pipe.spec)
        if args.tile is not None:  # issue 12 (H3): the tile settings and the first tile are checked instead
            from latentrt.runtime.tiles import check_tiled

            check_tiled(pipe, request, args.tile, args.tile_overlap)
        else:
            pipe.check(request)  # bad settings and sizes beyond memory are refused before anything runs
        if args.prompt is None:  # the image count follows the --condition lists: the pipeline counts them
            checked_output_paths(args.output, pipe.resolve(request)[0].batch)
        for line in pipe.engines.describe():
            print(f"engine: {line}")
        if args.tile is not None:  # issue 12 (H3)
            from latentrt.runtime.tiles import generate_tiled

            result = generate_tiled(pipe, request, args.tile, args.tile_overlap, callback=bar)
        else:
            result = pipe.generate(request, callback=bar)
    finally:
        bar.close()
        pipe.close()
    for note in result.notes:
        print(f"note: {note}")
    paths = output_paths(args.output, len(result.images))
    for i, (image, path) in enumerate(zip(result.images, paths)):
        save_png(image, path, result.metadata(i))
        print(f"wrote {path} ({image.width}x{image.height}, seed {result.seed})")
    print(format_table(result.timing, title=f"timing ({result.settings['backend']}, {result.settings['steps']} steps, "
                                            f"{result.settings['sampler']})"))
    return 0
