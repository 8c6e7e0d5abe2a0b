"""Pictures of a LoRA's effect: the same prompts and seeds rendered with the original and with
another file, side by side, with a pixel similarity and a difference image per pair.

The base pipeline loads once (diffusion.load_pipeline: a diffusers folder, or a single file with a
local config; float32); each LoRA goes in with the pipeline's own `load_lora_weights` and out again
(diffusion.load_lora), exactly as `lorad effect` loads them. Each prompt runs once per LoRA as one
batch of its seeds, each image with its own CPU generator seeded with its seed, so the same seed
starts from the same noise on any device and both LoRAs start from the same latents.

Per pair (8-bit RGB, as the pipeline would save them):
- `ssim`: scikit-image's structural_similarity as Wang et al. (2004) define it (Gaussian window
  sigma 1.5, population covariances, data range 255), over the RGB channels, mean over the image.
  1 is the same picture; an identical file gives exactly 1.
- the difference image: |original - other| per pixel and channel, times DIFF_GAIN (4), clipped to
  255: black where the two agree; a 64-level difference shows at full strength.
- `mean_abs_diff` / `max_abs_diff`: the unamplified difference, in 0..255 levels.
SSIM and the differences are computed at full size; the PNGs shown are scaled to at most
SHOWN_MAX pixels on the long side (the difference image by the block maximum, so a small spot
stays visible), so a report of 1024-pixel renders stays a few MB.

Engine layer: no library, daemon or report imports. The result is plain data (PNG bytes and
figures) that the report layer renders.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

from lorad.engine.effect.samples import DEFAULT_PROMPTS
from lorad.errors import LoradError

PREVIEW_PROMPTS = DEFAULT_PROMPTS[:2]  # a person and a scene
PREVIEW_SEEDS = 2  # seeds 1..N
PREVIEW_STEPS = 12  # enough for a recognisable picture from the usual schedulers; --steps for more
DIFF_GAIN = 4
SHOWN_MAX = 512
_SSIM_MIN_SIDE = 11  # the Gaussian window's size (sigma 1.5, truncated at 3.5 sigma)


@dataclass(frozen=True)
class PreviewPair:
    prompt: str
    seed: int
    ssim: float
    mean_abs_diff: float  # mean over pixels and channels of |original - other|, 0..255
    max_abs_diff: int
    original_png: bytes
    other_png: bytes
    diff_png: bytes
    blanked: bool  # the pipeline's safety checker replaced one of the two pictures

    def figures(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "ssim": self.ssim, "mean_abs_diff": self.mean_abs_diff,
                "max_abs_diff": self.max_abs_diff, "blanked": self.blanked}  # fmt: skip


@dataclass(frozen=True)
class PreviewResult:
    pairs: tuple[PreviewPair, ...]  # prompt by prompt, each prompt's seeds in order
    ssim_mean: float
    ssim_min: float
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    height: int
    width: int
    guidance_scale: float | None  # None: the pipeline's own default
    pipeline: str  # the diffusers pipeline class
    base: str
    base_sha256: str
    device: str
    seconds: float
    diff_gain: float = DIFF_GAIN
    shown_max: int = SHOWN_MAX

    def figures(self) -> dict:
        """The JSON-able figures, without the pictures (what `lorad preview --json` prints)."""
        return {"ssim_mean": self.ssim_mean, "ssim_min": self.ssim_min, "pairs": [p.figures() for p in self.pairs],
                **self._settings()}  # fmt: skip

    def to_doc(self) -> dict:
        """The figures and the pictures as PNG bytes: the input of lorad.report's preview section."""
        pairs = [{**p.figures(), "original_png": p.original_png, "other_png": p.other_png, "diff_png": p.diff_png}
                 for p in self.pairs]  # fmt: skip
        return {"ssim_mean": self.ssim_mean, "ssim_min": self.ssim_min, "pairs": pairs, **self._settings()}

    def _settings(self) -> dict:
        return {"prompts": list(self.prompts), "seeds": list(self.seeds), "steps": self.steps, "height": self.height,
                "width": self.width, "guidance_scale": self.guidance_scale, "pipeline": self.pipeline,
                "base": self.base, "base_sha256": self.base_sha256, "device": self.device, "seconds": self.seconds,
                "diff_gain": self.diff_gain, "shown_max": self.shown_max}  # fmt: skip


def render_preview(original: Path, other: Path, base: Path, *, prompts: list[str] | None = None,
                   seeds: int | list[int] | None = None, steps: int | None = None, size: int | None = None,
                   guidance_scale: float | None = None, device: str | None = None,
                   config: Path | None = None) -> PreviewResult:  # fmt: skip
    """Render every prompt with every seed, once with ORIGINAL and once with OTHER loaded into BASE.

    base/config/device as for measure_effect (a diffusers pipeline only: a causal LM is refused).
    seeds: a count N (seeds 1..N) or the seeds themselves. size: height = width in pixels (None:
    the pipeline's default). Raises LoradError for anything the user can act on.
    """
    from lorad.engine.effect._deps import require
    from lorad.engine.effect.base import CAUSAL_LM, base_sha256, describe_base
    from lorad.engine.effect.loras import check_lora

    started = time.perf_counter()
    prompts, seed_list, steps = _settings(prompts, seeds, steps, size, guidance_scale)
    model = describe_base(Path(base), None if config is None else Path(config))
    if model.kind == CAUSAL_LM:
        raise LoradError(f"{base}: a causal LM; lorad preview renders pictures with a diffusers pipeline "
                         "(for an LLM adapter, `lorad effect` compares next-token logits)")
    for path in (original, other):
        check_lora(Path(path), folder_wanted=False)
    require("peft", "transformers", "diffusers", "PIL", "skimage", what="rendering a preview")

    from lorad.engine.effect import diffusion
    from lorad.engine.effect.run import _device

    device = _device(device)
    pipe = diffusion.load_pipeline(model, device)
    renders: dict[str, list] = {}
    for name, path in (("original", Path(original)), ("other", Path(other))):
        diffusion.load_lora(pipe, path, name)
        try:
            renders[name] = [_render(pipe, p, seed_list, steps, size, guidance_scale) for p in prompts]
        finally:
            pipe.unload_lora_weights()
    pairs = []
    for prompt, (a_imgs, a_nsfw), (b_imgs, b_nsfw) in zip(prompts, renders["original"], renders["other"]):
        for i, seed in enumerate(seed_list):
            pairs.append(compare(a_imgs[i], b_imgs[i], prompt, seed, blanked=a_nsfw[i] or b_nsfw[i]))
    height, width = renders["original"][0][0][0].shape[:2]
    values = [p.ssim for p in pairs]
    return PreviewResult(
        pairs=tuple(pairs), ssim_mean=sum(values) / len(values), ssim_min=min(values), prompts=tuple(prompts),
        seeds=tuple(seed_list), steps=steps, height=int(height), width=int(width), guidance_scale=guidance_scale,
        pipeline=type(pipe).__name__, base=str(base), base_sha256=base_sha256(model), device=device,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def _settings(prompts, seeds, steps, size, guidance_scale) -> tuple[list[str], list[int], int]:
    prompts = list(PREVIEW_PROMPTS if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise LoradError("preview: prompts must be non-empty text")
    seeds = PREVIEW_SEEDS if seeds is None else seeds
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if not 1 <= seeds <= 64:
            raise LoradError("preview: --seeds must be 1 to 64")
        seed_list = list(range(1, seeds + 1))
    else:
        seed_list = list(seeds)
        if not seed_list or not all(isinstance(s, int) and s >= 0 for s in seed_list):
            raise LoradError("preview: seeds must be non-negative integers")
    steps = PREVIEW_STEPS if steps is None else steps
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise LoradError("preview: --steps must be 1 to 1000")
    if size is not None and (not isinstance(size, int) or not 16 <= size <= 8192 or size % 8):
        raise LoradError("preview: --size must be a multiple of 8 from 16 to 8192 pixels")
    if guidance_scale is not None and not guidance_scale >= 0:
        raise LoradError("preview: the guidance scale must be >= 0")
    return prompts, seed_list, steps


def _render(pipe, prompt: str, seeds: list[int], steps: int, size: int | None, guidance_scale: float | None):
    """(8-bit RGB pictures (H, W, 3), one per seed; whether the safety checker blanked each)."""
    import numpy as np
    import torch

    from lorad.engine.effect._deps import one_line, quiet

    kwargs = {"prompt": prompt, "num_images_per_prompt": len(seeds), "num_inference_steps": steps,
              "generator": [torch.Generator().manual_seed(s) for s in seeds], "output_type": "np"}  # fmt: skip
    if size is not None:
        kwargs["height"] = kwargs["width"] = size
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    try:
        with quiet(), torch.inference_mode():
            out = pipe(**kwargs)
    except Exception as e:  # noqa: BLE001 - the pipeline's refusal, told in one line
        raise LoradError(f"{type(pipe).__name__} could not render {prompt!r}: {one_line(e)}") from e
    images = out.images if hasattr(out, "images") else out[0]
    if isinstance(images, torch.Tensor):
        images = images.float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[0] != len(seeds) or images.shape[-1] != 3:
        raise LoradError(f"{type(pipe).__name__} returned pictures of shape {images.shape}; lorad preview "
                         "compares one RGB picture per seed")
    if not np.isfinite(images).all():
        raise LoradError(f"{type(pipe).__name__}: a rendered picture is not finite (NaN or inf)")
    pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)  # as diffusers' numpy_to_pil
    nsfw = getattr(out, "nsfw_content_detected", None) or [False] * len(seeds)
    return list(pixels), [bool(x) for x in nsfw]


def compare(a, b, prompt: str = "", seed: int = 0, blanked: bool = False) -> PreviewPair:
    """One pair of 8-bit RGB pictures (H, W, 3): SSIM, the differences, and the PNGs shown."""
    import numpy as np
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, dtype=np.uint8), np.asarray(b, dtype=np.uint8)
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise LoradError(f"pictures of shapes {a.shape} and {b.shape}: two RGB pictures of one size are compared")
    if min(a.shape[:2]) < _SSIM_MIN_SIDE:
        raise LoradError(f"pictures of {a.shape[1]}x{a.shape[0]} pixels: SSIM needs at least {_SSIM_MIN_SIDE}")
    ssim = float(structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))  # fmt: skip
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    shown_diff = np.clip(diff * DIFF_GAIN, 0, 255).astype(np.uint8)
    return PreviewPair(
        prompt=prompt, seed=int(seed), ssim=ssim, mean_abs_diff=float(diff.mean()), max_abs_diff=int(diff.max()),
        original_png=_png(_shrink(a)), other_png=_png(_shrink(b)), diff_png=_png(_shrink(shown_diff, block_max=True)),
        blanked=blanked,
    )  # fmt: skip


def _shrink(pixels, block_max: bool = False):
    """At most SHOWN_MAX pixels on the long side: by Lanczos, or by the block maximum (differences)."""
    import numpy as np
    from PIL import Image

    h, w = pixels.shape[:2]
    factor = -(-max(h, w) // SHOWN_MAX)  # ceil
    if factor <= 1:
        return pixels
    if block_max:
        ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
        padded = np.zeros((ph, pw, pixels.shape[2]), dtype=pixels.dtype)
        padded[:h, :w] = pixels
        return padded.reshape(ph // factor, factor, pw // factor, factor, -1).max(axis=(1, 3))
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def _png(pixels) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()
