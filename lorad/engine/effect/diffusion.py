"""The denoiser runner: any pipeline diffusers' DiffusionPipeline loads and loads LoRAs into.

Per measurement the base pipeline loads once and runs the sample set three times (base, original,
other), all prompts in one batch, with two hooks on the denoiser (`unet` or `transformer`):
- after each call, its output is kept at the recorded call indices, and after the last one a private
  exception stops the pipeline: a sample costs a few denoiser calls, no full render, no decoding;
- before each recorded call of a LoRA run, the latent input is replaced by the base run's, so the
  three runs see the same latents (the timestep schedule is the same, and the text encoders run with
  the LoRA loaded, so text-encoder modules count in the effect).
Each LoRA goes in with the pipeline's own `load_lora_weights` (diffusers is the loader measured) and
out with `unload_lora_weights`. Everything runs in float32.
A long-lived process may keep the base loaded between measurements (lorad.engine.effect.kept).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorad.engine.effect._deps import loaded_layers, one_line, quiet
from lorad.engine.effect.base import SINGLE_FILE, Base
from lorad.engine.effect.kept import KEPT
from lorad.engine.effect.measure import effect_retained
from lorad.engine.effect.samples import denoiser_samples
from lorad.errors import LoradError


class _Stop(Exception):
    """Raised by the hook after the last recorded call: the rest of the render is not needed."""


def run(original: Path, other: Path, base: Base, samples: dict | None, device: str) -> tuple[list[float], dict]:
    """(effect retained per sample, the sample set as recorded)."""
    s = denoiser_samples(samples)
    pipe = KEPT.take(base, device, load_pipeline)
    result = _measure(pipe, original, other, s)  # a failure drops the pipeline, whatever its state
    KEPT.give_back(base, pipe)
    return result


def _measure(pipe, original: Path, other: Path, s: dict) -> tuple[list[float], dict]:
    denoiser = _denoiser(pipe)
    for key in ("height", "width"):
        s[key] = s[key] or _default_size(pipe, denoiser)
    s.pop("timesteps", None)  # observed again below, never taken on trust
    reference = _run(pipe, denoiser, s, pinned=None)
    s["timesteps"] = [reference.timesteps[c] for c in s["calls"]]
    effects = {}
    for name, path in (("original", original), ("other", other)):
        load_lora(pipe, path, name)
        try:
            hooks = _run(pipe, denoiser, s, pinned=reference.inputs)
        finally:
            pipe.unload_lora_weights()
        effects[name] = [a - b for a, b in zip(_per_sample(hooks, s), _per_sample(reference, s))]
    return [effect_retained(o, x) for o, x in zip(effects["original"], effects["other"])], s


def load_pipeline(base: Base, device: str):  # -> diffusers.DiffusionPipeline
    import diffusers

    try:
        with quiet():
            if base.kind == SINGLE_FILE:
                assert base.config is not None
                name = json.loads((base.config / "model_index.json").read_text()).get("_class_name", "")
                cls = getattr(diffusers, str(name), None)
                if cls is None or not hasattr(cls, "from_single_file"):
                    raise LoradError(f"{base.config}: diffusers cannot load a single file into {name!r}")
                pipe = cls.from_single_file(str(base.path), config=str(base.config), local_files_only=True)
            else:
                # use_safetensors: a folder's .bin weights are pickles, and lorad never unpickles
                pipe = diffusers.DiffusionPipeline.from_pretrained(str(base.path), use_safetensors=True,
                                                                   local_files_only=True)  # fmt: skip
    except LoradError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the loader says, it is about the user's base
        raise LoradError(f"{base.path}: diffusers could not load the base model: {one_line(e)}") from e
    if not hasattr(pipe, "load_lora_weights"):
        raise LoradError(f"{base.path}: diffusers cannot load LoRAs into a {type(pipe).__name__}")
    with quiet():  # diffusers advises on casting; float32 is what lorad asks for, for every module
        pipe.to(device=device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise LoradError(f"{type(pipe).__name__}: no denoiser (unet or transformer) to measure")


def _default_size(pipe, denoiser: torch.nn.Module) -> int | None:
    """The pipeline's own default image size (what it renders when none is given), to record it."""
    size = getattr(pipe, "default_sample_size", None) or getattr(denoiser.config, "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    return size * factor if isinstance(size, int) and isinstance(factor, int) else None


def load_lora(pipe, path: Path, name: str) -> None:
    parts = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    try:
        with quiet(logging.CRITICAL):
            pipe.load_lora_weights(str(path), adapter_name=name)
    except Exception as e:  # noqa: BLE001 - diffusers' refusal, told to the user in one line
        pipe.unload_lora_weights()
        raise LoradError(f"{path}: the LoRA does not fit this base model ({type(pipe).__name__}): "
                         f"{one_line(e)}") from e
    if loaded_layers(parts, name) == 0:
        pipe.unload_lora_weights()
        raise LoradError(f"{path}: the LoRA does not fit this base model ({type(pipe).__name__}): "
                         "diffusers matched none of its modules")


@dataclass
class _Hooks:
    calls: list[int]
    pinned: dict[int, torch.Tensor] | None  # None: the base run, which records the latents
    count: int = 0
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    timesteps: dict[int, float] = field(default_factory=dict)

    def pre(self, module, args: tuple, kwargs: dict):
        i = self.count
        if i not in self.calls:
            return None
        args, kwargs = list(args), dict(kwargs)
        if args and isinstance(args[0], torch.Tensor):
            holder, key = args, 0
        else:
            key = next((k for k in ("sample", "hidden_states") if isinstance(kwargs.get(k), torch.Tensor)), None)
            if key is None:
                raise LoradError(f"{type(module).__name__}: cannot find the latent input of the denoiser")
            holder = kwargs
        if self.pinned is None:
            self.inputs[i] = holder[key].detach().clone()
        else:
            if self.pinned[i].shape != holder[key].shape:
                raise LoradError(f"denoiser call {i}: the latent input changed shape with the LoRA loaded")
            holder[key] = self.pinned[i]
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.timesteps[i] = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t or 0)
        return tuple(args), kwargs

    def post(self, module, args, kwargs, output) -> None:
        i, self.count = self.count, self.count + 1
        if i in self.calls:
            self.outputs[i] = _first_tensor(output).detach().float().cpu().clone()
        if i >= self.calls[-1]:
            raise _Stop


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    return output.sample  # diffusers' *Output dataclasses


def _run(pipe, denoiser: torch.nn.Module, s: dict, pinned: dict[int, torch.Tensor] | None) -> _Hooks:
    hooks = _Hooks(s["calls"], pinned)
    handles = [denoiser.register_forward_pre_hook(hooks.pre, with_kwargs=True),
               denoiser.register_forward_hook(hooks.post, with_kwargs=True)]  # fmt: skip
    kwargs = {"prompt": list(s["prompts"]), "num_inference_steps": s["num_inference_steps"],
              "generator": [torch.Generator().manual_seed(seed) for seed in s["seeds"]],
              "output_type": "latent", "height": s["height"], "width": s["width"]}  # fmt: skip
    if "guidance_scale" in s:
        kwargs["guidance_scale"] = s["guidance_scale"]
    try:
        with quiet(), torch.inference_mode():
            pipe(**kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if hooks.count <= hooks.calls[-1]:
        raise LoradError(f"the pipeline called its denoiser {hooks.count} times, but calls up to "
                         f"{hooks.calls[-1]} were asked for; raise num_inference_steps or lower the calls")
    return hooks


def _per_sample(hooks: _Hooks, s: dict) -> list[torch.Tensor]:
    """Each prompt's outputs at the recorded calls, flattened and joined. A call's batch holds the
    prompts in order, once per guidance branch (e.g. [unconditional..., conditional...])."""
    n = len(s["prompts"])
    out: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for c in s["calls"]:
        y = hooks.outputs[c].double()
        if y.shape[0] % n:
            raise LoradError(f"denoiser output batch {y.shape[0]} is not a multiple of the {n} prompts")
        y = y.reshape(-1, n, *y.shape[1:])
        for i in range(n):
            out[i].append(y[:, i].flatten())
    return [torch.cat(parts) for parts in out]
