"""lorad's serving rank rules, proved in the real clients that impose them.

diffusers hotswap: `enable_lora_hotswap(target_rank=R)` pads the first LoRA to R and later swaps copy
each new LoRA into those padded tensors, keeping the first one's config except for the scale. Four
different UNet LoRAs (three diffusers files from `save_lora_weights`, one kohya file), each reduced
by lorad under `--serve diffusers-hotswap --max-rank R` to its own single rank, swap into one
pipeline in turn, eager and under torch.compile, and the UNet then computes exactly what a fresh
pipeline computes with that LoRA loaded normally; the compiled UNet is never recompiled. The same
LoRAs reduced without the rule (per-module ranks) or not reduced at all do not swap right.

vLLM: one rank from its accepted set, and one scale `lora_alpha / r` for every module (vLLM's
PEFTHelper reads no rank_pattern / alpha_pattern). A PEFT adapter for a tiny Llama reduced with
`--serve vllm` loads in PEFT at that one rank and gives the logits of the base model with the file's
own update merged in, the update read by this test from the file and adapter_config.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.exc import RecompileError

from lorad.engine.engine import ReduceSettings, reduce_file
from lorad.engine.reduce.rank_rules import VLLM_RANKS
from tests import _serving_models as sm
from tests import _tiny_models as tm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared machine OpenMP's spinning
    threads cost a lot; the setting is restored for the modules that run after this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


R = 8  # target_rank given to enable_lora_hotswap, and --max-rank
FRO = 0.9
TOL = 2e-5  # max |difference| of UNet outputs (|output| ~ 1.3; fp32 reorderings give ~1e-6)
SIGNAL = 100 * TOL  # every LoRA must move the output by far more than TOL, or equality proves nothing

# name: (decay range, seed, format). The decay range sets how many directions fro 0.9 asks for.
LORAS = {
    "k": ((0.12, 1.5), 14, "kohya"),
    "a": ((0.05, 1.0), 11, "diffusers"),  # asks for more than R: capped at R
    "b": ((0.2, 2.0), 12, "diffusers"),
    "c": ((0.5, 3.0), 13, "diffusers"),
}
HOTSWAP = ReduceSettings("fro", FRO, max_rank=R, serve="diffusers-hotswap")
PLAIN = ReduceSettings("fro", FRO, max_rank=R)  # the same cap without the rule: per-module ranks


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{name: original}, {name.hs: reduced with the rule}, {b.plain, k.plain: reduced without it}.
    The kohya one is reduced by the `lorad reduce` command (running while the rest are made), the
    others by the engine API."""
    folder = tmp_path_factory.mktemp("serving")
    out: dict[str, Path] = {}
    cli = None
    for name, (decays, seed, fmt) in LORAS.items():
        unet = sm.trained_unet(decays, seed, gain=3.0)
        write = sm.write_unet_diffusers if fmt == "diffusers" else sm.write_unet_kohya
        out[name] = write(unet, folder / f"{name}.safetensors")
        out[f"{name}.hs"] = folder / f"{name}.hs.safetensors"
        if fmt == "kohya":
            cmd = [sys.executable, "-m", "lorad", "reduce", str(out[name]), "-o", str(out[f"{name}.hs"]),
                   "--method", "fro", "--param", str(FRO), "--serve", "diffusers-hotswap", "--max-rank", str(R),
                   "--json"]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1")  # see one_thread
            cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        else:
            reduce_file(out[name], out[f"{name}.hs"], HOTSWAP)
        if name in ("b", "k"):  # for the negatives
            out[f"{name}.plain"] = folder / f"{name}.plain.safetensors"
            reduce_file(out[name], out[f"{name}.plain"], PLAIN)
    assert cli is not None
    stdout, stderr = cli.communicate(timeout=300)
    assert cli.returncode == 0, stderr
    assert {m["rank_out"] for m in json.loads(stdout)["modules"]} == file_ranks(out["k.hs"])
    return out


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return sm.unet_inputs()


@pytest.fixture(scope="module")
def fresh(files: dict[str, Path], inputs) -> dict[str, torch.Tensor]:
    """The UNet output with each file loaded the ordinary way into its own fresh pipeline."""
    out = {"base": sm.unet_output(tm.tiny_pipeline().unet, inputs)}
    for key in ("a.hs", "b.hs", "c.hs", "k.hs", "k.plain"):
        pipe = tm.tiny_pipeline()
        pipe.load_lora_weights(str(files[key]), adapter_name="x")
        out[key] = sm.unet_output(pipe.unet, inputs)
    return out


def file_ranks(path: Path) -> set[int]:
    tensors, _ = tm.read_file(path)
    return {t.shape[0] for k, t in tensors.items() if k.endswith((".lora_A.weight", ".lora_down.weight"))}


def hotswap_pipeline():  # -> StableDiffusionPipeline ready for its first LoRA
    pipe = tm.tiny_pipeline()
    pipe.enable_lora_hotswap(target_rank=R)
    return pipe


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max())


# ---------------------------------------------------------------------------------------------
# diffusers hotswap


def test_each_lora_gets_its_own_single_rank_at_most_the_target(files: dict[str, Path]) -> None:
    """--serve diffusers-hotswap: one rank per file, the smallest that keeps fro 0.9 in every module
    (measured here on the original's deltas), capped at R, and each module is the best approximation
    of that rank; without the rule the same cap gives per-module ranks."""
    ranks = {}
    for name in LORAS:
        original, reduced = tm.file_deltas(files[name]), tm.file_deltas(files[f"{name}.hs"])
        wanted = max(tm.fro_rank(m.delta, FRO) for m in original.values())
        (ranks[name],) = file_ranks(files[f"{name}.hs"])
        assert ranks[name] == min(wanted, R), name
        for module, old in original.items():  # each module: the best approximation of the file's rank
            kept = tm.best_rank_k_retained(old.delta, ranks[name])
            error = tm.rel_error(old.delta, reduced[module].delta)
            assert error == pytest.approx((1 - kept**2) ** 0.5, abs=1e-4), (name, module)
        if f"{name}.plain" in files:
            assert len(file_ranks(files[f"{name}.plain"])) > 1, f"{name}: without the rule the ranks must differ"
        _, meta = tm.read_file(files[f"{name}.hs"])
        assert meta["lorad.serve"] == "diffusers-hotswap" and "uniform" in meta["lorad.rank_rule"]
    assert ranks["a"] == R and len(set(ranks.values())) == len(ranks), ranks


def test_hotswapped_unet_equals_a_fresh_load_of_each_lora(files, fresh, inputs) -> None:
    """Load b (padded to R), then swap in a, c, the kohya one and b again: after each swap the UNet
    computes what a fresh pipeline with that file computes."""
    order = ["b.hs", "a.hs", "c.hs", "k.hs", "b.hs"]
    for i, key in enumerate(order):
        assert max_diff(fresh[key], fresh["base"]) > SIGNAL, key
        if i:
            assert max_diff(fresh[key], fresh[order[i - 1]]) > SIGNAL, (order[i - 1], key)
    pipe = hotswap_pipeline()
    pipe.load_lora_weights(str(files[order[0]]), adapter_name="a")
    assert {layer.lora_A["a"].weight.shape[0] for _, layer in tm._lora_layers(pipe.unet)} == {R}
    assert max_diff(sm.unet_output(pipe.unet, inputs), fresh[order[0]]) <= TOL
    for key in order[1:]:
        pipe.load_lora_weights(str(files[key]), adapter_name="a", hotswap=True)
        assert max_diff(sm.unet_output(pipe.unet, inputs), fresh[key]) <= TOL, key


def test_without_the_rule_files_do_not_swap_right(files, fresh, inputs) -> None:
    """The negatives: per-module ranks and unreduced ranks, in the same pipeline set-up."""
    # diffusers per-module ranks: its alpha_pattern differs from the loaded adapter's, hotswap refuses
    pipe = hotswap_pipeline()
    pipe.load_lora_weights(str(files["a.hs"]), adapter_name="a")
    with pytest.raises(ValueError, match="alpha_pattern"):
        pipe.load_lora_weights(str(files["b.plain"]), adapter_name="a", hotswap=True)

    # kohya per-module ranks under one alpha: it swaps without a word, but hotswap scales every
    # module by alpha / (the most common rank), so every other module gets the wrong strength
    pipe = hotswap_pipeline()
    pipe.load_lora_weights(str(files["k.hs"]), adapter_name="a")
    pipe.load_lora_weights(str(files["k.plain"]), adapter_name="a", hotswap=True)
    assert max(file_ranks(files["k.plain"])) <= R  # no module is above the target: the ranks differing is the cause
    assert max_diff(sm.unet_output(pipe.unet, inputs), fresh["k.plain"]) > SIGNAL

    # the unreduced file (rank 16 > R) cannot be the first LoRA of a hotswap pipeline
    with pytest.raises(ValueError, match="original rank is larger"):
        hotswap_pipeline().load_lora_weights(str(files["b"]), adapter_name="a")


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the captures."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def test_compiled_unet_is_not_recompiled_across_swaps(files, fresh, inputs) -> None:
    """The documented order: enable_lora_hotswap, load the first LoRA, torch.compile the UNet, then
    hotswap. Dynamo captures the UNet on the first call; swapping to LoRAs of other ranks captures
    nothing new (and with error_on_recompile any recompilation would raise) while the compiled UNet
    computes each LoRA's fresh output. The unreduced file (rank 16 > R) then does force a
    recompilation: its tensors outgrow the padded ones, and dynamo's guard says so."""
    torch._dynamo.reset()
    backend = CountingBackend()
    try:
        pipe = hotswap_pipeline()
        pipe.load_lora_weights(str(files["c.hs"]), adapter_name="a")
        pipe.unet = torch.compile(pipe.unet, backend=backend)
        assert max_diff(sm.unet_output(pipe.unet, inputs), fresh["c.hs"]) <= TOL
        first = backend.graphs
        assert first >= 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            for key in ("a.hs", "k.hs", "b.hs", "c.hs"):
                pipe.load_lora_weights(str(files[key]), adapter_name="a", hotswap=True)
                assert max_diff(sm.unet_output(pipe.unet, inputs), fresh[key]) <= TOL, key
                assert backend.graphs == first, f"recompiled after swapping in {key}"
            pipe.load_lora_weights(str(files["b"]), adapter_name="a", hotswap=True)
            guard = rf"lora_A.*size mismatch at index 0\. expected {R}, actual {tm.UNET_RANK}"
            with pytest.raises(RecompileError, match=guard):
                sm.unet_output(pipe.unet, inputs)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# PEFT and vLLM


def vllm_reading(folder: Path) -> dict[str, torch.Tensor]:
    """How vLLM's PEFTHelper reads a folder: one scale lora_alpha / r (sqrt(r) with rsLoRA) for every
    module, patterns ignored. r must be an accepted rank; --serve vllm also promises every module's
    tensors have rank r, so the one scale and the --max-lora-rank check both fit every module."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] in VLLM_RANKS, f"vLLM accepts no rank {config['r']}"
    r, scale = config["r"], config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    tensors, _ = tm.read_file(folder / "adapter_model.safetensors")
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            assert down.shape[0] == r, f"{name}: rank {down.shape[0]}, adapter_config r {r}"
            up = tensors[f"{name}.lora_B.weight"].double()
            out[name.removeprefix("base_model.model.")] = scale * up @ down.double()
    return out


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # transformers, in PEFT
def test_vllm_reduced_peft_adapter_loads_at_one_rank_and_merges_exactly(tmp_path: Path) -> None:
    src = sm.write_llama_peft_dir(tmp_path / "adapter")
    original = sm.peft_file_deltas(src)
    wanted = {m: tm.fro_rank(d, FRO) for m, d in original.items()}
    assert len(set(wanted.values())) > 3, "the planted spectra should ask for mixed ranks"
    out = tmp_path / "vllm"
    report = reduce_file(src, out, ReduceSettings("fro", FRO, serve="vllm"))
    rank = min(r for r in VLLM_RANKS if r >= max(wanted.values()))
    assert {m.rank_out for m in report.modules} == {rank}

    model = sm.load_llama_adapter(out)
    layers = tm._lora_layers(model)
    assert len(layers) == len(original) == 2 * len(sm.LLAMA_RANKS)
    assert {layer.lora_A["default"].weight.shape[0] for _, layer in layers} == {rank}
    assert {layer.lora_B["default"].weight.shape[1] for _, layer in layers} == {rank}

    meant = sm.peft_file_deltas(out)  # PEFT's rules: r, lora_alpha and the patterns
    served = vllm_reading(out)  # vLLM's: one scale for all
    assert meant.keys() == served.keys() == original.keys()
    for module, delta in meant.items():
        assert tm.rel_error(delta, served[module]) < 1e-9, f"{module}: vLLM would read another strength"
        # the best rank-`rank` approximation of the original update (exact where it had <= rank directions)
        kept = tm.best_rank_k_retained(original[module], rank)
        assert tm.rel_error(original[module], delta) == pytest.approx((1 - kept**2) ** 0.5, abs=1e-4), module
    cut = [m for m, d in original.items() if torch.linalg.matrix_rank(d.float()) > rank]
    padded = [m for m in original if sm.LLAMA_RANKS[m.rsplit(".", 1)[-1]] < rank]
    assert cut and padded, "some modules must lose directions and some must be padded"

    ids = sm.llama_inputs()
    with torch.no_grad():
        got = model(ids).logits
        want = sm.merged_llama(meant)(ids).logits
        base = sm.tiny_llama()(ids).logits
    assert float((want - base).abs().max()) > 1e-2, "the adapter must change the logits"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
