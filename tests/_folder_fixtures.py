"""PEFT adapter folders for the folder tests: real adapter_config.json + adapter_model.safetensors
as PEFT saves them, a tiny model PEFT loads them into, and what a folder holds on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

MODULES = ("layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v")
DIM_IN, DIM_OUT = 32, 48


def adapter_files(seed: int = 0, rank: int = 8, true_rank: int = 2) -> dict[str, bytes]:
    """The files of a PEFT LoRA folder: rank `rank` factors of updates of rank `true_rank` (so a
    reduction to `true_rank` is exact), r=rank, lora_alpha=2*rank, a model card."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in MODULES:
        up = torch.zeros(DIM_OUT, rank)
        down = torch.zeros(rank, DIM_IN)
        up[:, :true_rank] = torch.randn(DIM_OUT, true_rank, generator=g)
        down[:true_rank] = torch.randn(true_rank, DIM_IN, generator=g)
        mix = torch.linalg.qr(torch.randn(rank, rank, generator=g))[0]  # spread over all r columns
        tensors[f"base_model.model.{name}.lora_A.weight"] = (mix.T @ down).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (up @ mix).contiguous()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q", "v"],
              "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "lora_dropout": 0.0,
              "bias": "none", "task_type": None, "base_model_name_or_path": None}  # fmt: skip
    from safetensors.torch import save

    return {
        "adapter_model.safetensors": save(tensors, metadata={"format": "pt"}),
        "adapter_config.json": json.dumps(config, indent=2).encode(),
        "README.md": b"---\nlibrary_name: peft\n---\nA model card.\n",
    }


def make_adapter(folder: Path, seed: int = 0, **kwargs: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in adapter_files(seed, **kwargs).items():
        (folder / name).write_bytes(data)
    return folder


def tree_of(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file in a folder (what a reader of the folder gets)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def config_of(folder: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((folder / "adapter_config.json").read_text())


class TinyModel(torch.nn.Module):
    """Two layers with `q` and `v` Linears: what MODULES name."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.layers = torch.nn.ModuleList()
        for _ in range(2):
            layer = torch.nn.Module()
            layer.q = torch.nn.Linear(DIM_IN, DIM_OUT)
            layer.v = torch.nn.Linear(DIM_IN, DIM_OUT)
            for lin in (layer.q, layer.v):
                torch.nn.init.normal_(lin.weight, generator=g)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer.q(x) + layer.v(x) for layer in self.layers)  # type: ignore[return-value]


def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Each module's weight update as PEFT applies the folder (PeftModel.from_pretrained, merged)."""
    from peft import PeftModel

    base = TinyModel()
    before = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    after = {n: m.weight.detach() for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear)}
    return {n: after[n] - before[n] for n in before}
