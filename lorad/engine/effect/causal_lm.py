"""The causal-LM runner: PEFT adapter folders on a transformers *ForCausalLM base.

The base loads once; each sample (one token sequence) runs through it alone (no padding, so no mask
to get wrong), then with the original adapter (PeftModel.from_pretrained, PEFT being the loader
measured) and with the other one (load_adapter + set_adapter). The effect is on the logits of every
position; the KL divergence of the two adapted models' next-token distributions comes with it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorad.engine.effect._deps import loaded_layers, one_line, quiet
from lorad.engine.effect.base import Base
from lorad.engine.effect.measure import effect_retained, kl_mean
from lorad.engine.effect.samples import logits_samples
from lorad.errors import LoradError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def run(original: Path, other: Path, base: Base, samples: dict | None,
        device: str) -> tuple[list[float], float, dict]:
    """(effect retained per sequence, mean KL over all tokens, the sample set as recorded)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = logits_samples(samples)
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(str(base.path), use_safetensors=True, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the loader says, it is about the user's base
        raise LoradError(f"{base.path}: transformers could not load the base model: {one_line(e)}") from e
    model = model.to(device=device, dtype=torch.float32).eval()
    vocab = model.get_input_embeddings().num_embeddings
    ids = _token_ids(s, base.path, vocab)
    base_logits = _logits(model, ids, device)
    try:
        with quiet(logging.CRITICAL):
            peft_model = PeftModel.from_pretrained(model, str(original), adapter_name="original")
    except Exception as e:  # noqa: BLE001 - PEFT's refusal, told to the user in one line
        raise _misfit(original, model, e) from e
    _check_fits(original, peft_model, "original")
    orig_logits = _logits(peft_model, ids, device)
    try:
        with quiet(logging.CRITICAL):
            peft_model.load_adapter(str(other), adapter_name="other")
    except Exception as e:  # noqa: BLE001
        raise _misfit(other, model, e) from e
    _check_fits(other, peft_model, "other")
    peft_model.set_adapter("other")
    other_logits = _logits(peft_model, ids, device)
    per_sample = [effect_retained(o - b, x - b) for b, o, x in zip(base_logits, orig_logits, other_logits)]
    return per_sample, kl_mean(torch.cat(orig_logits), torch.cat(other_logits)), s


def _token_ids(s: dict, folder: Path, vocab: int) -> list[list[int]]:
    """The ids to run, filled into `s`: given ones; the texts through the base's tokenizer; or, with
    no tokenizer in the folder, seeded random ids within the vocabulary (then the texts are unused
    and left out of the record)."""
    if "token_ids" not in s:
        tokenizer = _tokenizer(folder)
        if tokenizer is not None:
            s.pop("seed"), s.pop("length")
            s["token_ids"] = [list(tokenizer(text)["input_ids"]) for text in s["texts"]]
        else:
            gen = torch.Generator().manual_seed(s["seed"])
            s["token_ids"] = torch.randint(0, vocab, (len(s.pop("texts")), s["length"]), generator=gen).tolist()
    ids = s["token_ids"]
    if max(max(seq) for seq in ids) >= vocab:
        raise LoradError(f"samples: token ids beyond the base model's vocabulary of {vocab}")
    return ids


def _tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        with quiet():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise LoradError(f"{folder}: its tokenizer does not load: {one_line(e)}") from e


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: list[list[int]], device: str) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([seq], device=device)).logits[0].float().cpu() for seq in ids]


def _check_fits(path: Path, model: torch.nn.Module, adapter: str) -> None:
    if loaded_layers([model], adapter) == 0:
        raise LoradError(f"{path}: the adapter does not fit this base model: PEFT matched none of its modules")


def _misfit(path: Path, model: torch.nn.Module, e: Exception) -> LoradError:
    return LoradError(f"{path}: the adapter does not fit this base model ({type(model).__name__}): {one_line(e)}")
