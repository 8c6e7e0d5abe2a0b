"""Effect measurements kept with their variants: the real daemon in a subprocess, the real socket,
real SQLite. `record_effect` over the socket, then `lorad list`, `show` and `report` show the same
numbers; the refusals (unknown variant, the original, figures that cannot be a measurement, a
caller who may not mutate); and the daemon form of `lorad effect PATH` end to end on a tiny SD1.5
pipeline saved to disk, the measurement made in the CLI's own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorad.daemon.control.client import Client
from lorad.daemon.control.protocol import METHODS, Code, ControlError, encode_request
from lorad.daemon.control.server import Authorizer, ControlServer
from tests._daemon_fixtures import REPO, Daemon, cli_here, cli_json, lorad_env, make_lora, wait_for
from tests._effect_rig import reduced, sd_daemon, socket_of, variant_of
from tests.test_control import call_as, outsider, sockdir  # noqa: F401 (sockdir: a fixture)

BASE_SHA = "ab" * 32


def samples_doc(prompt: str = "a red house") -> tuple[dict[str, Any], str]:
    samples = {"kind": "denoiser", "prompts": [prompt], "seeds": [1], "calls": [0, 2], "num_inference_steps": 4}
    canonical = json.dumps(samples, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return samples, hashlib.sha256(canonical.encode()).hexdigest()[:16]


def effect_doc(per_sample: list[float], base: str = "/models/sd15", base_sha256: str = BASE_SHA,
               prompt: str = "a red house", **changes: Any) -> dict[str, Any]:  # fmt: skip
    """An EffectResult's JSON, as `lorad effect` sends it."""
    samples, sid = samples_doc(prompt)
    doc = {"effect_retained": sum(per_sample) / len(per_sample), "effect_retained_min": min(per_sample),
           "per_sample": per_sample, "kind": "denoiser", "kl_mean": None, "samples": samples, "samples_id": sid,
           "base": base, "base_sha256": base_sha256, "seconds": 1.5}  # fmt: skip
    return {**doc, **changes}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Daemon]]:
    tmp = tmp_path_factory.mktemp("effect_records")
    with sd_daemon(tmp) as daemon:
        yield tmp, daemon


def call(tmp: Path, method: str, **params: Any) -> Any:
    with Client(socket_of(tmp)) as client:
        return client.call(method, **params)


@pytest.fixture(scope="module")
def one(rig: tuple[Path, Daemon]) -> tuple[Path, Daemon, Path, dict[str, Any]]:
    """A kohya LoRA reduced and activated by the daemon: (tmp, daemon, its path, its list entry)."""
    tmp, daemon = rig
    path = make_lora(tmp / "loras" / "a.safetensors", seed=3)
    entry = wait_for(lambda: reduced(daemon.config, path), 90, 0.2, "a.safetensors reduced and activated")
    return tmp, daemon, path, entry


def test_recorded_effect_is_what_list_show_and_the_report_show(one: Any) -> None:
    tmp, daemon, path, entry = one
    config = daemon.config
    reduction, original = variant_of(entry, "reduced"), variant_of(entry, "original")
    assert reduction["effect_retained"] is None and reduction["effect"] is None  # not measured yet
    assert "EFFECT" not in cli_here(config, "list")[1]  # no empty column

    # The files the CLI would measure: the store's copies, under the LoRA's own name.
    files = call(tmp, "effect_files", target=str(path))
    assert (files["lora"], files["path"]) == (entry["id"], str(path))
    assert (files["variant"]["id"], files["reference"]["id"]) == (reduction["id"], original["id"])
    for stored, listed in ((files["variant"], reduction), (files["reference"], original)):
        [f] = stored["files"]
        assert f["name"] == "a.safetensors" and not stored["folder"] and stored["sha256"] == listed["sha256"]
        assert hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() == listed["sha256"]
    assert call(tmp, "effect_files", target=entry["id"], variant=reduction["id"]) == files

    per_sample = [0.8012, 0.9450]
    recorded = call(tmp, "record_effect", target=str(path), variant=reduction["id"], reference=original["id"],
                    effect=effect_doc(per_sample))  # fmt: skip
    mean = sum(per_sample) / len(per_sample)
    assert recorded["effect"]["effect_retained"] == mean and recorded["effect"]["effect_retained_min"] == 0.8012

    listed = variant_of(next(x for x in cli_json(config, "list") if x["id"] == entry["id"]), "reduced")
    assert (listed["effect_retained"], listed["effect_retained_min"]) == (mean, 0.8012)
    assert listed["effect"]["base"] == "/models/sd15" and listed["effect"]["base_sha256"] == BASE_SHA
    assert variant_of(entry, "original")["effect_retained"] is None
    table = cli_here(config, "list")[1].splitlines()
    assert table[0].split()[:6] == ["ID", "PATH", "ORIGINAL", "NOW", "ACTIVE", "EFFECT"]
    row = next(line for line in table if str(path) in line)
    assert f"{mean:.3f} min 0.801" in row

    shown = cli_json(config, "show", str(path))
    assert variant_of(shown, "reduced")["effect_retained"] == mean
    [measurement] = shown["effects"]
    assert measurement["per_sample"] == per_sample and measurement["samples"] == samples_doc()[0]
    assert measurement["reference_variant"] == original["id"] and measurement["measured_at"]
    text = cli_here(config, "show", str(path))[1]
    assert "EFFECT" in text and f"{mean:.3f} min 0.801" in text
    sid = samples_doc()[1]
    assert (f"variant {reduction['id']}: effect retained {mean:.4f} (worst sample 0.8012) against variant "
            f"{original['id']}, denoiser on base /models/sd15 (sha256 {BASE_SHA[:12]}), samples {sid}") in text
    assert any(e["kind"] == "measured" and e["detail"]["effect_retained"] == mean for e in shown["events"])

    out = tmp / "a.report.html"
    code, printed, err = cli_here(config, "report", str(path), "-o", str(out), "--json")
    assert code == 0, err
    doc = json.loads(printed)["doc"]
    in_report = next(v for v in doc["variants"] if v["id"] == reduction["id"])
    assert (in_report["effect_retained"], in_report["effect_retained_min"]) == (mean, 0.8012)
    html = out.read_text()
    assert "Effect retained (mean, worst)" in html and f"{mean:.4f}" in html and "worst 0.8012" in html
    assert sid in html and BASE_SHA[:12] in html
    code, printed, err = cli_here(config, "report", "--all", "-o", str(tmp / "library.html"), "--json")
    assert code == 0, err
    row = next(x for x in json.loads(printed)["doc"]["loras"] if x["id"] == entry["id"])
    assert (row["effect_retained"], row["effect_retained_min"]) == (mean, 0.8012)
    assert f"{mean:.4f} (worst 0.8012)" in (tmp / "library.html").read_text()


def test_a_new_measurement_replaces_its_base_and_samples_and_the_latest_is_shown(one: Any) -> None:
    tmp, daemon, path, entry = one
    reduction = variant_of(entry, "reduced")

    def record(per_sample: list[float], **kw: Any) -> None:
        call(tmp, "record_effect", target=entry["id"], variant=reduction["id"], effect=effect_doc(per_sample, **kw))

    record([0.5, 0.7])  # the same base and samples as the test before: replaces its row
    record([-0.25, 0.25], base="/models/other", base_sha256="cd" * 32)  # another base: below 0 is a figure
    shown = cli_json(daemon.config, "show", str(path))
    assert [(e["base"], e["effect_retained"]) for e in shown["effects"]] == [("/models/other", 0.0), ("/models/sd15", 0.6)]
    listed = variant_of(next(x for x in cli_json(daemon.config, "list") if x["id"] == entry["id"]), "reduced")
    assert (listed["effect_retained"], listed["effect_retained_min"], listed["effect"]["base"]) == (0.0, -0.25, "/models/other")
    record([0.5, 0.7])  # measured again on the first base: it is the latest now
    listed = variant_of(next(x for x in cli_json(daemon.config, "list") if x["id"] == entry["id"]), "reduced")
    assert (listed["effect_retained"], listed["effect"]["base"]) == (0.6, "/models/sd15")
    assert len(cli_json(daemon.config, "show", str(path))["effects"]) == 2


@pytest.mark.parametrize("bad, why", [
    ({"effect_retained": float("nan")}, "must be finite"),
    ({"effect_retained": 1.25, "per_sample": [1.25], "effect_retained_min": 1.25}, "at most 1"),
    ({"per_sample": [0.5, float("inf")]}, "must be finite"),
    ({"effect_retained_min": 0.9}, "above the mean"),
    ({"effect_retained": 0.7}, "not the mean of per_sample"),
    ({"effect_retained": "0.5"}, "must be a number"),
    ({"kind": "pixels"}, "kind must be one of"),
    ({"samples_id": "0123456789abcdef"}, "not the id of samples"),
    ({"base_sha256": "xyz"}, "64 lower-case hex"),
    ({"per_sample": []}, "list of 1 to"),
    ({"kl_mean": -1.0}, "never negative"),
])  # fmt: skip
def test_figures_that_cannot_be_a_measurement_are_refused(one: Any, bad: dict[str, Any], why: str) -> None:
    tmp, daemon, path, entry = one
    reduction = variant_of(entry, "reduced")
    before = cli_json(daemon.config, "show", str(path))["effects"]
    with pytest.raises(ControlError) as err:
        call(tmp, "record_effect", target=str(path), variant=reduction["id"], effect={**effect_doc([0.5, 0.7]), **bad})
    assert err.value.code == Code.BAD_PARAMS and why in err.value.message
    assert cli_json(daemon.config, "show", str(path))["effects"] == before  # nothing recorded


def test_the_wrong_variant_lora_or_reference_is_refused(one: Any) -> None:
    tmp, daemon, path, entry = one
    reduction, original = variant_of(entry, "reduced"), variant_of(entry, "original")
    good = effect_doc([0.5, 0.7])
    cases = [
        ({"target": str(path), "variant": 999_999, "effect": good}, Code.NOT_FOUND, "has no variant 999999"),
        ({"target": str(path), "variant": original["id"], "effect": good}, Code.BAD_PARAMS, "is the original"),
        ({"target": 424_242, "variant": reduction["id"], "effect": good}, Code.NOT_FOUND, "no LoRA with id"),
        ({"target": str(tmp / "elsewhere.safetensors"), "variant": reduction["id"], "effect": good},
         Code.OUTSIDE_WATCH, "not inside a watched folder"),
        ({"target": str(path), "variant": reduction["id"], "reference": reduction["id"], "effect": good},
         Code.CONFLICT, f"compared with variant {original['id']}"),
        ({"target": str(path), "variant": reduction["id"], "effect": [0.5]}, Code.BAD_PARAMS, "must be dict"),
        ({"target": str(path), "variant": reduction["id"]}, Code.BAD_PARAMS, "'effect' is required"),
    ]  # fmt: skip
    for params, code, why in cases:
        with pytest.raises(ControlError) as err:
            call(tmp, "record_effect", **params)
        assert (err.value.code, why in err.value.message) == (code, True), (params, err.value.message)
    with pytest.raises(ControlError) as err:  # a sample set past the request limit: refused unread
        call(tmp, "record_effect", target=str(path), variant=reduction["id"],
             effect=effect_doc([0.5], prompt="x" * 70_000))  # fmt: skip
    assert err.value.code == Code.TOO_LARGE
    with pytest.raises(ControlError) as err:
        call(tmp, "effect_files", target=str(path), variant=original["id"])
    assert err.value.code == Code.NOT_FOUND and "is the original" in err.value.message


def test_only_callers_who_may_switch_may_record_or_ask_for_the_files(sockdir: Path) -> None:
    assert METHODS["record_effect"].mutating and METHODS["effect_files"].mutating
    uid, gid = outsider()
    reached: list[str] = []
    handlers = {name: (lambda params, peer, name=name: reached.append(name) or {}) for name in ("record_effect", "effect_files")}
    server = ControlServer(sockdir / "lorad.sock", handlers, Authorizer(daemon_uid=0), group=gid)
    server.start()
    try:
        for method, params in (("effect_files", {"target": 1}),
                               ("record_effect", {"target": 1, "variant": 2, "effect": effect_doc([0.5])})):  # fmt: skip
            reply = call_as(uid, gid, server.path, encode_request(1, method, params))
            assert reply["error"]["code"] == Code.FORBIDDEN, reply
        assert reached == []
    finally:
        server.stop()


def test_lorad_effect_measures_in_the_cli_and_records_what_list_and_show_then_report(rig: tuple[Path, Daemon]) -> None:
    from tests import _tiny_models as tm

    tmp, daemon = rig
    base = tmp / "base"
    tm.tiny_pipeline().save_pretrained(base)
    written = tm.write_kohya_lora(tm.trained_pipeline(), tmp / "tiny.safetensors")
    path = tmp / "sd" / "tiny.safetensors"
    os.rename(written, path)  # dropped whole into the watched folder
    entry = wait_for(lambda: reduced(daemon.config, path), 120, 0.2, "tiny.safetensors reduced and activated")
    reduction = variant_of(entry, "reduced")

    done = subprocess.run([sys.executable, "-m", "lorad", "effect", str(path), "--base", str(base), "--json",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          env=lorad_env(LORAD_SOCKET=str(socket_of(tmp))))  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    printed = json.loads(done.stdout)
    assert printed["variant"] == reduction["id"] and printed["kind"] == "denoiser"
    assert printed["effect_retained_min"] <= printed["effect_retained"] < 1  # rank 16 -> 2 lost some effect
    assert printed["base"] == str(base) and len(printed["base_sha256"]) == 64

    listed = variant_of(next(x for x in cli_json(daemon.config, "list") if x["id"] == entry["id"]), "reduced")
    assert (listed["effect_retained"], listed["effect_retained_min"]) == (printed["effect_retained"], printed["effect_retained_min"])
    assert (listed["effect"]["samples_id"], listed["effect"]["base_sha256"]) == (printed["samples_id"], printed["base_sha256"])
    text = cli_here(daemon.config, "show", str(path))[1]
    assert f"effect retained {printed['effect_retained']:.4f} (worst sample {printed['effect_retained_min']:.4f})" in text
    assert f"on base {base} (sha256 {printed['base_sha256'][:12]}), samples {printed['samples_id']}" in text

    # Without --json: the figures for people; a LoRA never reduced is refused in one line.
    plain = subprocess.run([sys.executable, "-m", "lorad", "effect", str(entry["id"]), "--base", str(base),
                            "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=str(REPO),
                           env=lorad_env(LORAD_SOCKET=str(socket_of(tmp))))  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert f"variant   #{reduction['id']} rank2, compared with #{variant_of(entry, 'original')['id']} original" in plain.stdout
    assert f"effect retained  {printed['effect_retained']:.4f} mean" in plain.stdout


def test_an_adapter_folder_is_measured_from_its_stored_files_as_a_folder(rig: tuple[Path, Daemon]) -> None:
    """A PEFT adapter folder on a tiny causal LM: the daemon names each stored file of the original's
    and the variant's trees; the CLI reads them as two folders (logits, with the KL divergence)."""
    from tests import _serving_models as sm

    tmp, daemon = rig
    base = tmp / "llama"
    sm.tiny_llama().save_pretrained(base)
    written = sm.write_llama_peft_dir(tmp / "adapter-build")
    original_weights = hashlib.sha256((written / "adapter_model.safetensors").read_bytes()).hexdigest()
    path = tmp / "sd" / "adapter"
    os.rename(written, path)
    entry = wait_for(lambda: reduced(daemon.config, path), 120, 0.2, "the adapter folder reduced and activated")
    reduction = variant_of(entry, "reduced")

    files = call(tmp, "effect_files", target=str(path))
    for stored in (files["variant"], files["reference"]):
        assert stored["folder"] and stored["name"] == "adapter"
        assert {f["name"] for f in stored["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    weights = next(f for f in files["reference"]["files"] if f["name"] == "adapter_model.safetensors")
    assert hashlib.sha256(Path(weights["path"]).read_bytes()).hexdigest() == original_weights

    done = subprocess.run([sys.executable, "-m", "lorad", "effect", str(path), "--base", str(base), "--json",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          env=lorad_env(LORAD_SOCKET=str(socket_of(tmp))))  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    printed = json.loads(done.stdout)
    assert printed["kind"] == "logits" and printed["variant"] == reduction["id"]
    assert printed["effect_retained"] < 1 and printed["kl_mean"] is not None and printed["kl_mean"] >= 0
    listed = variant_of(next(x for x in cli_json(daemon.config, "list") if x["id"] == entry["id"]), "reduced")
    assert (listed["effect_retained"], listed["effect"]["kl_mean"]) == (printed["effect_retained"], printed["kl_mean"])
