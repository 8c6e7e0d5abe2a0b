"""Every trainer layout of a 2026 LoRA folder is reduced, and written so EVERY loader reads it at the
strength lorad reports.

For each layout of tests/_layouts.py the real engine reduces the file twice (`fro 0.9`: mixed ranks;
`rank 4`), then, with the independent readers of tests/_readers.py:
  (a) exact truncation: each reduced module's intended delta is the best rank-k approximation of the
      input's intended delta (dense float64 SVD here), to the dtype's rounding; the report's
      rank_out / fro_retained / rel_error say what was measured; lora_B.bias keeps scale * bias;
      pass-through modules and non-LoRA tensors are bit for bit the same;
  (b) one strength for every loader: on every output, tensor-only (ComfyUI, A1111/Forge), metadata
      (diffusers/PEFT) and intended readings agree module by module; where they disagree on the
      input, the report says so in a note;
  (c) a real client: the diffusers pipeline that reads the layout (`lora_state_dict`) converts the
      reduced file into groups (modules sharing one lora_A, e.g. Flux fused qkv -> to_q/to_k/to_v)
      whose delta is the best rank-k truncation of the original's group delta;
  (d) what the output keeps: the same keys in the same order (new `.alpha` keys only where the
      input's reduced modules carry alphas), dtypes, one constant alpha, minimal honest metadata.
Each check is a function returning the problems it finds; the last section feeds each one a
deliberately wrong file (a corrupted lorad output) to show it fails when it should.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorad.engine.engine import ReduceSettings, reduce_file
from lorad.errors import ReduceError, TransientError
from tests import _layouts as L
from tests import _readers as R

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported (lazily, in the client checks)

FRO = 0.9
RANK = 4
METHODS = {"fro": ReduceSettings(method="fro", param=FRO), "rank": ReduceSettings(method="rank", param=RANK)}
# Relative Frobenius error allowed for rounding the written factors to the layout's dtype (a wrong
# scale is off by a factor, orders above these).
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
# lora_bias appears beside them only where modules carry lora_B.bias (diffusers would drop them)
MINIMAL_FIELDS = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_bias"}
# Built so that loader families read the INPUT at different strengths.
SPLIT_INPUTS = ("diffusers_sdxl", "diffusers_sd3", "diffusers_legacy_sd15", "kohya_sd15_alpha0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP spin-waits on a busy shared machine
    (two threads there made some builds 30x slower). The previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



class _Runs:
    """Each layout built once and reduced once per method, for the whole module."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.built: dict[str, L.Built] = {}
        self.runs: dict[tuple[str, str], tuple[Path, object]] = {}

    def original(self, layout: L.Layout) -> L.Built:
        if layout.name not in self.built:
            sub = self.folder / layout.name
            sub.mkdir()
            self.built[layout.name] = layout.build(sub)
        return self.built[layout.name]

    def reduced(self, layout: L.Layout, method: str):
        key = (layout.name, method)
        if key not in self.runs:
            built = self.original(layout)
            suffix = "" if built.path.is_dir() else ".safetensors"
            dst = built.path.parent / f"{layout.name}.{method}{suffix}"
            report = reduce_file(built.path, dst, METHODS[method])
            self.runs[key] = (dst, report)
        return self.runs[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(tmp_path_factory.mktemp("layouts"))


LAYOUT = {layout.name: layout for layout in L.LAYOUTS}
ALL = [pytest.param(layout, id=layout.name) for layout in L.LAYOUTS]
WITH_PIPELINE = [pytest.param(layout, id=layout.name) for layout in L.LAYOUTS if layout.pipeline]
BOTH = ["fro", "rank"]


# ---------------------------------------------------------------------------------------------
# The checks


def truncation_problems(src: Path, out: Path, modules, method: str, dtype: torch.dtype,
                        reduced: tuple[str, ...]) -> list[str]:
    """(a): each reduced module is the best rank-k truncation of the input, at the input's intended
    strength; the rank is the rule's choice; the report's numbers are the measured ones."""
    before, after = R.intended_deltas(src), R.intended_deltas(out)
    by_name = {m.name: m for m in modules}
    problems = []
    if set(after) != set(before):
        problems.append(f"output modules differ from the input's: {sorted(set(after) ^ set(before))[:4]}")
    src_file, out_file = R.open_file(src), R.open_file(out)
    src_mods, out_mods = R.plain_modules(src_file), R.plain_modules(out_file)
    src_scales, out_scales = R.scales(src), R.scales(out)
    tol = TOL[dtype]
    for name in reduced:
        claim = by_name.get(name)
        if claim is None or name not in after:
            problems.append(f"{name}: missing from the report or the output")
            continue
        if claim.skipped is not None:
            problems.append(f"{name}: a plain LoRA module was skipped ({claim.skipped})")
            continue
        old, new = before[name], after[name]
        k = R.rank_of(out_file, out_mods[name])
        best, s = R.svd_truncate(old, k)
        cap = min(claim.rank_in, int((s > 0).sum()))
        want_k = R.fro_rank(s, FRO, cap) if method == "fro" else min(RANK, claim.rank_in)
        if k != want_k or claim.rank_out != k:
            problems.append(f"{name}: written rank {k}, reported {claim.rank_out}, the {method} rule says {want_k}")
        off = float((new - best).norm() / old.norm())
        if off > tol:
            problems.append(f"{name}: the written delta is {off:.3g} (relative) away from the best rank-{k} "
                            f"truncation of the input's intended delta (read at "
                            f"{float(new.norm() / best.norm()):.4g}x its strength)")
        retained = float(s[:k].norm() / s.norm())
        if abs(claim.fro_retained - retained) > 1e-4:
            problems.append(f"{name}: fro_retained reported {claim.fro_retained:.6f}, measured {retained:.6f}")
        measured = R.rel(new, old)
        if abs(claim.rel_error - measured) > tol + 1e-4:
            problems.append(f"{name}: rel_error reported {claim.rel_error:.6f}, measured {measured:.6f}")
        if "bias" in src_mods[name].keys:
            b_old = src_scales[name]["intended"] * src_file.tensors[src_mods[name].keys["bias"]].double()
            bias_key = out_mods[name].keys.get("bias")
            b_new = out_scales[name]["intended"] * out_file.tensors[bias_key].double() if bias_key else 0 * b_old
            if R.rel(b_new, b_old) > tol:
                problems.append(f"{name}: scale * lora_B.bias changed by {R.rel(b_new, b_old):.3g} (relative)")
    return problems


def passthrough_problems(built: L.Built, out: Path, modules) -> list[str]:
    """(a): modules that are not plain LoRAs and non-LoRA tensors come out bit for bit."""
    src, dst = R.open_file(built.path), R.open_file(out)
    found, other = R.module_keys(R.key_order(built.path))
    keep = list(other)
    problems = []
    for name in built.passed:
        keep += R.all_module_key_list(found[name])
        claim = next((m for m in modules if m.name == name), None)
        if claim is None or not claim.skipped:
            problems.append(f"{name} is not a plain LoRA and must be passed through (with a reason), not reduced")
    changed = [k for k in keep if k not in dst.tensors or not _same_bits(src.tensors[k], dst.tensors[k])]
    if changed:
        problems.append(f"pass-through tensors changed or missing: {changed[:5]}")
    return problems


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def strength_problems(out: Path) -> list[str]:
    """(b): tensor-only, metadata and intended readings of every module of an output agree."""
    try:
        readings = R.scales(out)
    except R.ReaderError as e:
        return [f"a loader cannot read the output: {e}"]
    problems = []
    for name, s in readings.items():
        values = {k: v for k, v in s.items() if v is not None}
        lo, hi = min(values.values()), max(values.values())
        if hi - lo > 1e-6 * max(abs(hi), 1e-12):
            problems.append(f"{name}: " + ", ".join(f"{k} loaders read scale {v:.6g}" for k, v in values.items()))
    return problems


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_", "lora_transformer_")


def expects_alpha(built: L.Built) -> bool:
    """Alpha keys out where the input's reduced modules carry them, and on every kohya-style file:
    diffusers before 0.40 mis-scales mixed ranks without alphas, and every kohya loader reads one
    constant alpha right (reference/formats.md §0)."""
    return built.alpha_keys or any(name.startswith(_KOHYA_PREFIXES) for name in built.reduced)


def keys_problems(built: L.Built, out: Path) -> list[str]:
    """(d): the input's keys, in their order, with their dtypes; new keys only .alpha of reduced modules
    and only where alpha keys are expected (expects_alpha)."""
    src, dst = R.open_file(built.path), R.open_file(out)
    before, after = R.key_order(built.path), R.key_order(out)
    problems = []
    dropped = [k for k in before if k not in dst.tensors]
    if dropped:
        problems.append(f"keys dropped: {dropped[:4]}")
    if [k for k in after if k in src.tensors] != [k for k in before if k in dst.tensors]:
        problems.append("the input's keys are not in their original order")
    new_keys = [k for k in after if k not in src.tensors]
    allowed = {f"{name}.alpha" for name in built.reduced} if expects_alpha(built) else set()
    if set(new_keys) - allowed:
        why = ("only .alpha keys of reduced modules may be added" if expects_alpha(built)
               else "the input's reduced modules carry no alpha keys, so the output must add none")
        problems.append(f"new keys {sorted(set(new_keys) - allowed)[:4]}: {why}")
    changed = [(k, src.tensors[k].dtype, dst.tensors[k].dtype) for k in before
               if k in dst.tensors and dst.tensors[k].dtype != src.tensors[k].dtype]  # fmt: skip
    if changed:
        problems.append(f"dtype changed: {changed[:3]}")
    alpha_dtypes = {src.tensors[k].dtype for k in before if k.endswith(".alpha")}
    if new_keys and alpha_dtypes and not {dst.tensors[k].dtype for k in new_keys} <= alpha_dtypes:
        problems.append(f"new alpha keys in {dst.tensors[new_keys[0]].dtype}, the input's are {alpha_dtypes}")
    return problems


def encoding_problems(built: L.Built, out: Path) -> list[str]:
    """(d): alpha keys in -> ONE constant alpha out on every reduced module; none in -> none out;
    lora_adapter_metadata minimal (and with alphas: lora_alpha = that alpha, no alpha_pattern); kohya
    and provenance metadata honest."""
    if out.is_dir():
        return _peft_config_problems(built.path, out)
    dst = R.open_file(out)
    mods = R.plain_modules(dst)
    alphas = {name: R.alpha_of(dst, mods[name]) for name in built.reduced if name in mods}
    problems = []
    if expects_alpha(built):
        values = set(alphas.values())
        if None in values:
            problems.append(f"reduced modules without alpha: {[n for n, a in alphas.items() if a is None][:3]}")
        elif len(values) != 1:
            problems.append(f"per-module alphas written ({sorted(values)[:5]}): diffusers mis-reads them")
    elif set(alphas.values()) != {None}:
        problems.append("alpha keys written where the input had none")
    for comp, cfg in dst.diffusers_configs.items():
        extra = set(cfg) - MINIMAL_FIELDS
        if extra:
            problems.append(f"lora_adapter_metadata[{comp}] is not minimal: {sorted(extra)}")
        one_alpha = next(iter(alphas.values()), None)
        if expects_alpha(built) and (cfg.get("lora_alpha") != one_alpha or cfg.get("alpha_pattern")):
            problems.append(f"with alpha keys, metadata[{comp}] must say lora_alpha = the one alpha ({one_alpha}) "
                            f"and no alpha_pattern: lora_alpha {cfg.get('lora_alpha')}, "
                            f"alpha_pattern {cfg.get('alpha_pattern')}")
    if "sshs_model_hash" in dst.metadata:
        raw = out.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        if dst.metadata["sshs_model_hash"] != hashlib.sha256(raw[8 + n :]).hexdigest():
            problems.append("stale sshs_model_hash")
    src_meta = R.open_file(built.path).metadata
    if "ss_network_dim" in src_meta:
        ranks = {R.rank_of(dst, mods[n]) for n in built.reduced if n in mods}
        want = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        if dst.metadata.get("ss_network_dim") != want:
            problems.append(f"ss_network_dim {dst.metadata.get('ss_network_dim')!r}, ranks {sorted(ranks)}")
        for key in ("ss_output_name", "ss_base_model_version", "ss_network_module", "modelspec.title"):
            if dst.metadata.get(key) != src_meta.get(key):
                problems.append(f"metadata {key} not kept")
    if dst.metadata.get("lorad.source_sha256") != hashlib.sha256(built.path.read_bytes()).hexdigest():
        problems.append("lorad.source_sha256 is not the input's sha256")
    return problems


def _peft_config_problems(src: Path, out: Path) -> list[str]:
    before = json.loads((src / R.PEFT_CONFIG).read_text())
    after = json.loads((out / R.PEFT_CONFIG).read_text())
    rewritten = {"r", "lora_alpha", "rank_pattern", "alpha_pattern"}
    problems = []
    lost = set(before) - set(after)
    if lost:
        problems.append(f"adapter_config.json lost fields: {sorted(lost)}")
    changed = [k for k in before if k not in rewritten and before[k] != after.get(k)]
    if changed:
        problems.append(f"adapter_config.json changed fields lorad must keep: {changed}")
    side = sorted(p.name for p in src.iterdir())
    if sorted(p.name for p in out.iterdir()) != side:
        problems.append("side files (README.md, ...) not carried over")
    return problems + strength_problems(out)


# The diffusers client


def diffusers_groups(pipeline: str, path: Path) -> dict[frozenset, tuple[torch.Tensor, int]]:
    """`<Pipeline>.lora_state_dict(path)` -> {modules sharing one lora_A: (their stacked delta, rank)}.

    The scale is what diffusers applies after conversion: the component's lora_adapter_metadata,
    else the returned network alphas (alpha / rank), else 1 (converters that bake alpha into the
    factors return none)."""
    import diffusers

    cls = getattr(diffusers, pipeline)
    kwargs = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(cls.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    out = cls.lora_state_dict(str(path), **kwargs)
    state_dict, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    alphas = {k: float(v) for k, v in (alphas or {}).items()}
    configs: dict[str, dict] = {}
    for key, value in (metadata or {}).items():
        comp, _, fld = key.partition(".")
        configs.setdefault(comp, {})[fld] = value
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in state_dict.items():
        for down_sfx, up_sfx in ((".lora_A.weight", ".lora_B.weight"), (".down.weight", ".up.weight"),
                                 (".lora_A", ".lora_B")):  # fmt: skip
            if key.endswith(down_sfx) and key[: -len(down_sfx)] + up_sfx in state_dict:
                name = key[: -len(down_sfx)]
                modules[name] = (state_dict[name + up_sfx], down)
                break
    assert modules, f"{pipeline}.lora_state_dict found no LoRA modules in {path.name}"
    groups: dict[str, list[str]] = {}
    downs: dict[str, torch.Tensor] = {}
    for name, (_, down) in modules.items():
        d = down.to(torch.float64).reshape(down.shape[0], -1)
        digest = hashlib.sha1(str(tuple(d.shape)).encode() + d.numpy().tobytes()).hexdigest()
        groups.setdefault(digest, []).append(name)
        downs[digest] = d
    result = {}
    for digest, names in groups.items():
        names.sort()
        ups = []
        for name in names:
            up = modules[name][0].to(torch.float64)
            rank = up.shape[1]
            ups.append(_diffusers_scale(name, rank, configs, alphas) * up.reshape(up.shape[0], rank))
        result[frozenset(names)] = (torch.cat(ups) @ downs[digest], downs[digest].shape[0])
    return result


def _peft_name(name: str) -> str:
    for suffix in (".lora_linear_layer", ".lora", "_lora"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _diffusers_scale(name: str, rank: int, configs: dict, alphas: dict) -> float:
    module = _peft_name(name)
    comp = R.component(module)
    if comp in configs:
        return R.peft_scale(configs[comp], R.config_path(module), rank, "diffusers metadata")
    rest = name[len(comp) + 1 :] if comp else name
    # Flux-style alphas keep their own key; the SD/SDXL kohya converter names them
    # "<component>.<diffusers name before '.lora.'>.alpha".
    for key in (f"{name}.alpha", f"{module}.alpha", f"{comp}.{rest.split('.lora.')[0]}.alpha",
                f"{name}.down.weight.alpha"):  # fmt: skip
        if key in alphas:
            return alphas[key] / rank
    return 1.0


def diffusers_problems(pipeline: str, src: Path, out: Path, dtype: torch.dtype) -> list[str]:
    """(c): the pipeline's reading of the output is, group by group, the best rank-k truncation of its
    reading of the input."""
    before, after = diffusers_groups(pipeline, src), diffusers_groups(pipeline, out)
    if set(after) != set(before):
        differ = sorted(map(sorted, set(after) ^ set(before)))[:3]
        return [f"{pipeline} converts the output into other modules (groups sharing a lora_A): {differ}"]
    problems = []
    for group, (old, _) in before.items():
        new, k = after[group]
        best, _ = R.svd_truncate(old, k)
        off = float((new - best).norm() / old.norm())
        if off > TOL[dtype]:
            more = f" (+{len(group) - 1} sharing its lora_A)" if len(group) > 1 else ""
            problems.append(f"{sorted(group)[0]}{more}: {off:.3g} away from the best rank-{k} truncation "
                            f"(read at {float(new.norm() / best.norm()):.4g}x)")
    return problems


def _fail(problems: list[str], what: str) -> None:
    assert not problems, what + ":\n" + "\n".join(problems[:10])


# ---------------------------------------------------------------------------------------------
# The layouts are what they claim


@pytest.mark.parametrize("layout", ALL)
def test_layout_is_what_it_claims(runs: _Runs, layout: L.Layout) -> None:
    """The independent reader finds exactly the builder's modules, in the layout's dtype; a fro 0.9
    rule on the intended deltas picks mixed ranks (the planted spectra work)."""
    built = runs.original(layout)
    lf = R.open_file(built.path)
    modules, _ = R.module_keys(R.key_order(built.path))
    plain = [n for n, m in modules.items() if m.plain]
    assert sorted(plain) == sorted(built.reduced), (
        f"reader's plain modules differ from the builder's: {sorted(set(plain) ^ set(built.reduced))[:4]}")
    assert sorted(n for n, m in modules.items() if not m.plain) == sorted(built.passed)
    for name in plain:
        assert lf.tensors[modules[name].keys["up"]].dtype == layout.dtype, name
    deltas = R.intended_deltas(built.path).values()
    ranks = {R.fro_rank(R.svd_truncate(d, 1)[1], FRO, min(d.shape)) for d in deltas}
    assert len(ranks) > 1 or len(plain) == 1, f"fro {FRO} picks one rank {ranks} for every module"
    split = any(len({round(v, 9) for v in s.values() if v is not None}) > 1 for s in R.scales(built.path).values())
    assert split == (layout.name in SPLIT_INPUTS), "loaders should agree on this input" if split else \
        "this layout was built so that loaders disagree on its input"


# ---------------------------------------------------------------------------------------------
# (a) exact truncation, and a report that says what was measured


@pytest.mark.parametrize("method", BOTH)
@pytest.mark.parametrize("layout", ALL)
def test_exact_truncation_and_honest_report(runs: _Runs, layout: L.Layout, method: str) -> None:
    built = runs.original(layout)
    out, report = runs.reduced(layout, method)
    names = {m.name for m in report.modules}
    assert names == set(built.reduced) | set(built.passed), (
        f"report modules differ from the file's: missing {sorted(set(built.reduced) | set(built.passed) - names)[:3]}, "
        f"extra {sorted(names - set(built.reduced) - set(built.passed))[:3]}"
    )
    _fail(truncation_problems(built.path, out, report.modules, method, layout.dtype, built.reduced),
          "not the exact truncation the report claims")


@pytest.mark.parametrize("layout", ALL)
def test_passthrough_and_non_lora_tensors_are_bit_for_bit(runs: _Runs, layout: L.Layout) -> None:
    built = runs.original(layout)
    out, report = runs.reduced(layout, "fro")
    _fail(passthrough_problems(built, out, report.modules), "pass-through broken")


# ---------------------------------------------------------------------------------------------
# (b) one strength for every loader


@pytest.mark.parametrize("method", BOTH)
@pytest.mark.parametrize("layout", ALL)
def test_output_reads_the_same_in_every_loader(runs: _Runs, layout: L.Layout, method: str) -> None:
    out, _ = runs.reduced(layout, method)
    _fail(strength_problems(out), "the output's strength depends on the loader")


@pytest.mark.parametrize("layout", [pytest.param(LAYOUT[n], id=n) for n in SPLIT_INPUTS])
def test_input_disagreement_is_noted(runs: _Runs, layout: L.Layout) -> None:
    """Where loader families read the INPUT at different strengths, lorad follows the file's own
    format (checked above) and says so."""
    _, report = runs.reduced(layout, "fro")
    assert any("disagree" in note.lower() for note in report.notes), (
        f"loaders read the input differently but no note says so: {list(report.notes)}")


# ---------------------------------------------------------------------------------------------
# (c) the diffusers pipeline that reads the layout


@pytest.mark.parametrize("layout", WITH_PIPELINE)
def test_diffusers_reads_the_reduced_file_as_a_truncation(runs: _Runs, layout: L.Layout) -> None:
    built = runs.original(layout)
    out, _ = runs.reduced(layout, "fro")
    assert layout.pipeline is not None
    _fail(diffusers_problems(layout.pipeline, built.path, out, layout.dtype),
          f"{layout.pipeline} reads the reduced file wrongly")


# ---------------------------------------------------------------------------------------------
# (d) what the output keeps


@pytest.mark.parametrize("method", BOTH)
@pytest.mark.parametrize("layout", ALL)
def test_output_keeps_keys_order_and_dtypes(runs: _Runs, layout: L.Layout, method: str) -> None:
    built = runs.original(layout)
    out, _ = runs.reduced(layout, method)
    _fail(keys_problems(built, out), "the output does not keep the input's keys")


@pytest.mark.parametrize("method", BOTH)
@pytest.mark.parametrize("layout", ALL)
def test_output_scale_encoding_and_metadata(runs: _Runs, layout: L.Layout, method: str) -> None:
    built = runs.original(layout)
    out, _ = runs.reduced(layout, method)
    _fail(encoding_problems(built, out), "the output's scale encoding or metadata is wrong")


# ---------------------------------------------------------------------------------------------
# DoRA: its modules pass through (DESIGN); a file of nothing else is refused


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_peft_dora_folder_is_refused_with_a_reason_and_nothing_written(tmp_path: Path) -> None:
    """Every module of a DoRA adapter must pass through, so an output would be a copy that saves
    nothing (and the daemon would record a pointless variant): the engine refuses the folder, says
    why, naming DoRA, and leaves no output behind and the input as it was."""
    built = L.peft_llm_dora(tmp_path)
    assert built.passed and not built.reduced
    assert json.loads((built.path / R.PEFT_CONFIG).read_text())["use_dora"] is True
    before = _tree_bytes(built.path)
    dst = tmp_path / "dora.fro0.9"
    with pytest.raises(ReduceError) as refused:
        reduce_file(built.path, dst, METHODS["fro"])
    message = str(refused.value)
    assert f"none of its {len(built.passed)} modules can be reduced" in message, message
    assert "DoRA" in message, message
    assert not isinstance(refused.value, TransientError)  # the same every time: the daemon must not retry
    assert sorted(p.name for p in tmp_path.iterdir()) == [built.path.name], "an output or temp file was left"
    assert _tree_bytes(built.path) == before


def test_dora_modules_pass_through_exactly_beside_reduced_loras(runs: _Runs) -> None:
    """A file mixing DoRA modules (LyCORIS dora_scale) with plain LoRAs is reduced, not refused: the
    DoRA modules come out bit for bit, reported as DoRA with their reason; the plain ones shrink."""
    layout = LAYOUT["lycoris_sdxl_mixed"]
    built = runs.original(layout)
    out, report = runs.reduced(layout, "fro")
    src, dst = R.open_file(built.path), R.open_file(out)
    dora = [name for name in built.passed if f"{name}.dora_scale" in src.tensors]
    assert dora and built.reduced, "the layout no longer mixes DoRA with plain LoRA modules"
    by_name = {m.name: m for m in report.modules}
    for name in dora:
        m = by_name[name]
        assert (m.kind, m.rank_out) == ("dora", m.rank_in) and m.skipped and "DoRA" in m.skipped, m
        keys = {f"{name}.{part}" for part in ("lora_up.weight", "lora_down.weight", "alpha", "dora_scale")}
        assert {k for k in src.tensors if k.startswith(f"{name}.")} == keys
        changed = [k for k in sorted(keys) if k not in dst.tensors or not _same_bits(src.tensors[k], dst.tensors[k])]
        assert not changed, f"DoRA tensors changed or missing: {changed}"
    for name in built.reduced:
        m = by_name[name]
        assert m.skipped is None and m.rank_out < m.rank_in, m
    assert out.stat().st_size < built.path.stat().st_size


# ---------------------------------------------------------------------------------------------
# The checks fail on wrong files (negative controls: each corrupts a real lorad output)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a safetensors file through `edit(tensors, metadata)` (which changes them in place)."""
    lf = R.open_file(src)
    tensors = {k: lf.tensors[k].clone() for k in R.key_order(src)}
    metadata = dict(lf.metadata)
    edit(tensors, metadata)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_checks_catch_a_scale_folded_wrong(runs: _Runs, tmp_path: Path) -> None:
    """One module at k/r of its strength (lorad 0.1's fal/diffusers bug): (a) and (c) both say so."""
    layout = LAYOUT["kohya_flux"]
    built = runs.original(layout)
    out, report = runs.reduced(layout, "fro")
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    claim = next(m for m in report.modules if m.name == name)
    factor = claim.rank_out / claim.rank_in

    def edit(t: dict, _m: dict) -> None:
        t[f"{name}.lora_up.weight"] = (t[f"{name}.lora_up.weight"].float() * factor).to(layout.dtype)

    bad = _rewrite(out, tmp_path / "bad.safetensors", edit)
    found = truncation_problems(built.path, bad, report.modules, "fro", layout.dtype, built.reduced)
    assert len(found) >= 1 and all(name in p for p in found) and any("away from the best" in p for p in found)
    found = diffusers_problems("FluxPipeline", built.path, bad, layout.dtype)
    assert len(found) == 1 and "attn.to_" in found[0] and "+2 sharing" in found[0], found
    assert diffusers_problems("FluxPipeline", built.path, out, layout.dtype) == []


def test_checks_catch_a_rank_k_that_is_not_the_best(runs: _Runs, tmp_path: Path) -> None:
    """Right rank, right scale, wrong directions (the 2nd..k+1th instead of the top k)."""
    layout = LAYOUT["aitoolkit_flux"]
    built = runs.original(layout)
    out, report = runs.reduced(layout, "fro")
    name = "transformer.transformer_blocks.0.ff.net.0.proj"
    delta = R.intended_deltas(built.path)[name]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = next(m.rank_out for m in report.modules if m.name == name)
    keep = list(range(1, k + 1))

    def edit(t: dict, _m: dict) -> None:
        t[f"{name}.lora_B.weight"] = (u[:, keep] * s[keep]).to(layout.dtype).contiguous()
        t[f"{name}.lora_A.weight"] = vh[keep].to(layout.dtype).contiguous()

    bad = _rewrite(out, tmp_path / "bad.safetensors", edit)
    found = truncation_problems(built.path, bad, report.modules, "fro", layout.dtype, built.reduced)
    assert any(name in p and "away from the best" in p for p in found), found


def test_checks_catch_a_scale_only_metadata_undoes(runs: _Runs, tmp_path: Path) -> None:
    """lorad 0.1 on diffusers files: the factors carry scale / (lora_alpha / k) and only the metadata
    restores it; ComfyUI reads such a file at another strength. (b) says so; a stale full config
    (the input's r) is caught as a rank PEFT refuses."""
    layout = LAYOUT["diffusers_sd3"]
    built = runs.original(layout)
    out, _ = runs.reduced(layout, "fro")
    lf = R.open_file(out)
    mods = R.plain_modules(lf)
    lora_alpha = 2.5  # no module has rank 2.5, so every module's two readings differ

    def edit(t: dict, m: dict) -> None:
        ranks = {}
        for name, mk in mods.items():
            k = R.rank_of(lf, mk)
            ranks[R.config_path(name)] = k
            t[mk.keys["up"]] = (t[mk.keys["up"]].double() * k / lora_alpha).to(layout.dtype)
        m["lora_adapter_metadata"] = json.dumps({"transformer.r": 8, "transformer.lora_alpha": lora_alpha,
                                                 "transformer.rank_pattern": ranks,
                                                 "transformer.alpha_pattern": {}})  # fmt: skip

    bad = _rewrite(out, tmp_path / "bad.safetensors", edit)
    found = strength_problems(bad)
    assert len(found) == len(mods) and all("tensor loaders read scale" in p for p in found), found

    def stale(t: dict, m: dict) -> None:
        m["lora_adapter_metadata"] = R.open_file(built.path).metadata["lora_adapter_metadata"]

    found = strength_problems(_rewrite(out, tmp_path / "stale.safetensors", stale))
    assert len(found) == 1 and "PEFT refuses" in found[0], found


def test_checks_catch_per_module_alphas(runs: _Runs, tmp_path: Path) -> None:
    """kohya resize_lora's dynamic encoding (alpha_i = scale * k_i): every loader reads the same
    strength, but diffusers mis-reads per-module alphas; (d) says so, (a) and (b) do not object."""
    layout = LAYOUT["kohya_sd15"]
    built = runs.original(layout)
    out, report = runs.reduced(layout, "fro")
    lf = R.open_file(out)
    mods = R.plain_modules(lf)

    def edit(t: dict, _m: dict) -> None:
        for name, mk in mods.items():
            k, alpha = R.rank_of(lf, mk), R.alpha_of(lf, mk)
            new_alpha = 0.5 * k  # scale 0.5 per module ...
            t[mk.keys["up"]] = (t[mk.keys["up"]].double() * (alpha / k) / 0.5).to(layout.dtype)  # ... same delta
            t[mk.keys["alpha"]] = torch.tensor(new_alpha, dtype=t[mk.keys["alpha"]].dtype)

    bad = _rewrite(out, tmp_path / "bad.safetensors", edit)
    assert any("per-module alphas" in p for p in encoding_problems(built, bad))
    assert strength_problems(bad) == []
    assert truncation_problems(built.path, bad, report.modules, "fro", layout.dtype, built.reduced) == []


def test_checks_catch_dtype_and_key_changes(runs: _Runs, tmp_path: Path) -> None:
    layout = LAYOUT["musubi_wan"]
    built = runs.original(layout)
    out, _ = runs.reduced(layout, "fro")
    up = "lora_unet_blocks_0_ffn_0.lora_up.weight"

    def edit(t: dict, _m: dict) -> None:
        t[up] = t[up].float()
        t["lora_unet_blocks_0_ffn_0.scale_hint"] = torch.ones(1)
        del t["lora_unet_blocks_1_ffn_2.alpha"]

    found = keys_problems(built, _rewrite(out, tmp_path / "bad.safetensors", edit))
    assert any("dtype changed" in p and up in p for p in found), found
    assert any("new keys" in p for p in found) and any("keys dropped" in p for p in found), found


def test_checks_catch_a_changed_passthrough(runs: _Runs, tmp_path: Path) -> None:
    layout = LAYOUT["lycoris_sdxl_mixed"]
    built = runs.original(layout)
    out, report = runs.reduced(layout, "fro")
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_out_0.dora_scale"

    def edit(t: dict, _m: dict) -> None:
        t[key] = (t[key].float() * 1.001).to(t[key].dtype)

    found = passthrough_problems(built, _rewrite(out, tmp_path / "bad.safetensors", edit), report.modules)
    assert len(found) == 1 and key in found[0], found
