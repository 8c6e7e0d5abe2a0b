"""Benchmark: time to make a LoRA servable by diffusers hotswap, original files vs lorad's reduced ones.

    python benchmarks/bench_serving.py [--loras 20] [--max-rank 64] [--variants original,hotswap,fro]

1. Writes N genuine diffusers LoRA files for an SD1.5-shaped UNet (if missing) under
   benchmarks/out/serving/original/: StableDiffusionPipeline.save_lora_weights with the LoraConfig
   as metadata, the 128 attention Linears diffusers' train_text_to_image_lora.py targets (to_q,
   to_k, to_v, to_out.0 of 16 transformer blocks), rank 64, 96 or 128 (seeded), alpha = rank,
   fp16, each module a planted spectrum from make_sdxl_lora.random_spectrum (power law or
   exponential with a noise floor, tuned on a real SDXL LoRA).
2. Reduces them with ONE `lorad reduce` command per variant (timed, child process):
     hotswap  --method fro --param 0.9 --serve diffusers-hotswap --max-rank R
     fro      --method fro --param 0.9                (per-module ranks: hotswap refuses these)
3. Measures each variant in its own child process: builds the SD1.5 UNet from its real config
   (random fp16 weights; tiny text encoder and VAE, which the UNet-only LoRAs never touch), then
     original, hotswap  pipe.enable_lora_hotswap(target_rank=T) (T = the largest rank among the
                        files), load_lora_weights(first, adapter_name="lora"), then
                        load_lora_weights(each next, adapter_name="lora", hotswap=True)
     fro                load_lora_weights(f, adapter_name="lora") then delete_adapters("lora"),
                        each in turn (it also tries one hotswap and records diffusers' refusal)
   `--rounds` times over the list, and prints the first load's time, the median of the other
   swaps, the time for all N (first + (N-1) x median), the bytes read per round (the sum of the
   files' sizes), the child's peak RSS (os.wait4) and its RSS with the bare pipeline, and the
   ratios against the originals. The page cache is warm (the files were just written) unless
   --cold, which evicts each file (posix_fadvise DONTNEED, this file's pages only) before its load.
4. Times original vs hotswap once more in ONE child, a pipeline each, alternating file by file, so
   that the shared machine's load swings hit both alike (the separate children give the RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "serving"
RANKS = (64, 96, 128)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (the fields that differ from the defaults)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / transformers import: never the hub


def sd15_unet(device: str = "meta", dtype=None):  # -> UNet2DConditionModel
    """The SD1.5 UNet from its config. On "cpu": fp16 random weights, allocated once (no fp32 copy)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    if device == "meta":
        return unet
    unet = unet.to(dtype=dtype or torch.float16).to_empty(device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return unet.eval()


def lora_modules() -> list[tuple[str, int, int]]:
    """(module path, out, in) of every Linear the LoRAs target, in the UNet's order."""
    import torch

    unet = sd15_unet("meta")
    return [(name, m.out_features, m.in_features) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in TARGETS)]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1. the LoRA files


def make_loras(folder: Path, count: int) -> list[Path]:
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    sys.path.insert(0, str(HERE))
    from make_sdxl_lora import random_spectrum

    folder.mkdir(parents=True, exist_ok=True)
    modules = lora_modules()
    paths = []
    for i in range(count):
        path = folder / f"lora_{i:02d}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        gen = torch.Generator().manual_seed(1000 + i)
        rank = RANKS[int(torch.randint(len(RANKS), (1,), generator=gen))]
        layers = {}
        for name, out_f, in_f in modules:
            s, _ = random_spectrum(gen, rank)
            qb, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=gen))
            qa, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=gen))
            rot, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen))
            root = s.sqrt().float()  # alpha = rank: scale 1, so B.A carries the spectrum
            layers[f"{name}.lora_B.weight"] = ((qb * root) @ rot).half().contiguous()
            layers[f"{name}.lora_A.weight"] = (rot.T @ (qa * root).T).half().contiguous()
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=path.name,
                                                  unet_lora_adapter_metadata=config.to_dict())  # fmt: skip
        print(f"  wrote {path.name}: rank {rank}, {path.stat().st_size:,} B", flush=True)
    return paths


# ---------------------------------------------------------------------------------------------
# 2. lorad


def reduce_all(originals: list[Path], folder: Path, extra: list[str]) -> tuple[list[Path], float | None]:
    """One `lorad reduce` over all files into `folder` (skipped when it is complete); its wall time."""
    done = sorted(folder.glob("*.safetensors")) if folder.exists() else []
    if len(done) == len(originals):
        return done, None
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lorad", "reduce", *map(str, originals), "-o", str(folder),
           "--method", "fro", "--param", "0.9", *extra]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    done = sorted(folder.glob("*.safetensors"))
    assert len(done) == len(originals), f"{folder}: {len(done)} outputs for {len(originals)} inputs"
    return done, wall


def file_ranks(path: Path) -> set[int]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_A.weight")}


# ---------------------------------------------------------------------------------------------
# 3. the measured child


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def evict(path: Path) -> None:
    """Drop this one file's pages from the page cache (fsync first: only clean pages can go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pipeline():  # -> StableDiffusionPipeline with the SD1.5 UNet
    sys.path.insert(0, str(ROOT))
    from diffusers.utils import logging as dlogging

    from tests import _tiny_models as tm

    dlogging.set_verbosity_error()  # "no LoRA keys for the text encoder", once per file
    tokenizer = tm.offline_tokenizer()
    return tm.StableDiffusionPipeline(
        vae=tm.tiny_vae(), text_encoder=tm.tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        unet=sd15_unet("cpu"), scheduler=tm.DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def child(variant: str, target: int, rounds: int, cold: bool, files: list[Path]) -> dict:
    """Make each file servable in turn, `rounds` times over the list; times per file, peak RSS.
    With `cold`, each file is evicted from the page cache just before its (timed) load."""
    pipe = pipeline()
    result: dict = {"base_rss": rss_now()}
    times: list[float] = []  # one per file made servable, in order
    if variant == "fro":  # per-module ranks: no hotswap, so load it, and delete it before the next
        for _ in range(rounds):
            for path in files:
                if cold:
                    evict(path)
                t = time.perf_counter()
                pipe.load_lora_weights(str(path), adapter_name="lora")
                pipe.delete_adapters("lora")
                times.append(time.perf_counter() - t)
        pipe.enable_lora_hotswap(target_rank=target)
        pipe.load_lora_weights(str(files[0]), adapter_name="lora")
        try:
            pipe.load_lora_weights(str(files[1]), adapter_name="lora", hotswap=True)
            result["hotswap"] = "accepted"
        except Exception as e:  # noqa: BLE001 - what diffusers says is the result
            result["hotswap"] = f"refused: {type(e).__name__}: {str(e)[:90]}..."
    else:
        pipe.enable_lora_hotswap(target_rank=target)
        for r in range(rounds):
            for i, path in enumerate(files):
                if cold:
                    evict(path)
                t = time.perf_counter()
                pipe.load_lora_weights(str(path), adapter_name="lora", hotswap=r > 0 or i > 0)
                times.append(time.perf_counter() - t)
        lora = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and "lora" in m.lora_A]
        assert {m.lora_A["lora"].weight.shape[0] for m in lora} == {target}
        # what every later forward pass carries: the LoRA slots, padded to the target rank
        result["lora_params"] = sum(m.lora_A["lora"].weight.numel() + m.lora_B["lora"].weight.numel() for m in lora)
    result.update(times=times, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return result


def interleaved(targets: tuple[int, int], rounds: int, cold: bool, files: list[Path]) -> dict:
    """Both hotswap variants in ONE process, a pipeline each, alternating file by file: a load-average
    swing on a shared machine then hits both alike. `files` is the originals, then the reduced."""
    half = len(files) // 2
    lists = {"original": files[:half], "hotswap": files[half:]}
    pipes = {name: pipeline() for name in lists}
    times: dict[str, list[float]] = {name: [] for name in lists}
    for name, target in zip(lists, targets):
        pipes[name].enable_lora_hotswap(target_rank=target)
    for r in range(rounds):
        for i in range(half):
            for name, pipe in pipes.items():
                path = lists[name][i]
                if cold:
                    evict(path)
                t = time.perf_counter()
                pipe.load_lora_weights(str(path), adapter_name="lora", hotswap=r > 0 or i > 0)
                times[name].append(time.perf_counter() - t)
    return {"times": times}


def measure(variant: str, target: list[int], rounds: int, cold: bool, files: list[Path]) -> dict:
    """The child in a fresh process; its own peak RSS from wait4 (and the figures it prints)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--target", *map(str, target),
           "--rounds", str(rounds), *(["--cold"] if cold else []), *map(str, files)]  # fmt: skip
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{variant} child failed:\n{err.read()[-4000:]}")
        doc = json.loads(out.read().strip().splitlines()[-1])
    doc.update(wall=wall, wait4_peak=usage.ru_maxrss * 1024)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loras", type=int, default=20)
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--variants", default="original,hotswap,fro")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rounds", type=int, default=3, help="times over the list of files, in one process")
    parser.add_argument("--cold", action="store_true",
                        help="evict each file from the page cache (posix_fadvise) before it is loaded")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for this process and every child (lorad reduce included)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "interleaved":
            print(json.dumps(interleaved(tuple(args.target), args.rounds, args.cold, args.files)))
        else:
            print(json.dumps(child(args.child, args.target[0], args.rounds, args.cold, args.files)))
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported, here and in the children

    load1, _, _ = os.getloadavg()
    print(f"load average {load1:.2f} on {os.cpu_count()} CPUs; {args.loras} LoRAs; --max-rank {args.max_rank}; "
          f"OMP_NUM_THREADS={args.threads}", flush=True)
    meta_unet = sd15_unet("meta")
    print(f"SD1.5 UNet: {sum(p.numel() for p in meta_unet.parameters()):,} parameters, "
          f"{len(list(meta_unet.buffers()))} buffers; the LoRAs target {len(lora_modules())} Linears", flush=True)
    started = time.perf_counter()
    originals = make_loras(args.out / "original", args.loras)
    print(f"LoRA files ready ({time.perf_counter() - started:.1f} s)", flush=True)
    sets = {"original": (originals, None)}
    wanted = args.variants.split(",")
    if "hotswap" in wanted:
        sets["hotswap"] = reduce_all(originals, args.out / f"hotswap{args.max_rank}",
                                     ["--serve", "diffusers-hotswap", "--max-rank", str(args.max_rank)])  # fmt: skip
    if "fro" in wanted:
        sets["fro"] = reduce_all(originals, args.out / "fro0.9", [])
    results = {}
    for variant in wanted:
        files, reduce_wall = sets[variant]
        ranks = [file_ranks(f) for f in files]
        target = max(max(r) for r in ranks)
        size = sum(f.stat().st_size for f in files)
        print(f"measuring {variant} ...", flush=True)
        doc = measure(variant, [target], args.rounds, args.cold, files)
        doc.update(size=size, ranks=ranks, target=target, reduce_wall=reduce_wall)
        results[variant] = doc
    gib = 1 << 30
    n = args.loras
    cache = "cold: each file evicted from the page cache before its load" if args.cold else "warm page cache"
    print(f"\nmaking {n} LoRAs servable in turn ({cache}), {args.rounds} rounds in one process per variant; "
          f"'all {n}' is the first load plus {n - 1} x the median of the other {n * args.rounds - 1} swaps "
          f"(or load+deletes)")  # fmt: skip
    print(f"{'variant':9} {'ranks':>13} {'bytes / round':>15} {'first s':>8} {'median s':>9} "
          f"{'all ' + str(n) + ' s':>9} {'rounds s':>20} {'peak RSS GiB':>12} {'- bare GiB':>10}")  # fmt: skip
    for variant, d in results.items():
        times = d["times"]
        d["median"] = statistics.median(times[1:])
        d["all"] = times[0] + (n - 1) * d["median"]
        per_round = " ".join(f"{sum(times[i:i + n]):.1f}" for i in range(0, len(times), n))
        uniform = all(len(r) == 1 for r in d["ranks"])
        lo, hi = min(min(r) for r in d["ranks"]), max(max(r) for r in d["ranks"])
        rank_text = f"{lo}-{hi}" + ("" if uniform else " mixed")
        print(f"{variant:9} {rank_text:>13} {d['size']:>15,} {times[0]:>8.2f} {d['median']:>9.3f} {d['all']:>9.2f} "
              f"{per_round:>20} {d['wait4_peak'] / gib:>12.2f} "
              f"{(d['wait4_peak'] - d['base_rss']) / gib:>10.2f}")  # fmt: skip
    print()
    base = results.get("original")
    for variant, d in results.items():
        if d.get("reduce_wall") is not None:
            print(f"{variant}: lorad reduce of all {len(d['ranks'])} files took {d['reduce_wall']:.1f} s (one command)")
        if "hotswap" in d:
            print(f"{variant}: enable_lora_hotswap + hotswap=True: {d['hotswap']}")
        if "lora_params" in d:
            print(f"{variant}: target_rank {d['target']}: {d['lora_params']:,} LoRA parameters in the UNet for every "
                  f"LoRA swapped in (the padded slots every forward pass computes with)")
        if base is not None and variant != "original":
            above = (d["wait4_peak"] - d["base_rss"]) / max(base["wait4_peak"] - base["base_rss"], 1)
            print(f"{variant} vs original: bytes {d['size'] / base['size']:.3f}x, median swap "
                  f"{d['median'] / base['median']:.3f}x, all {n} {d['all'] / base['all']:.3f}x, "
                  f"peak RSS {d['wait4_peak'] / base['wait4_peak']:.3f}x, RSS above the bare pipeline {above:.3f}x")
    if "original" in results and "hotswap" in results:
        print(f"\ninterleaved, one process, a pipeline each, alternating swaps ({args.rounds} rounds) ...", flush=True)
        both = measure("interleaved", [results["original"]["target"], results["hotswap"]["target"]], args.rounds,
                       args.cold, sets["original"][0] + sets["hotswap"][0])["times"]  # fmt: skip
        med = {name: statistics.median(t[1:]) for name, t in both.items()}
        every = {name: t[0] + (n - 1) * med[name] for name, t in both.items()}
        for name, t in both.items():
            print(f"  {name:9} first {t[0]:.2f} s, median swap {med[name]:.3f} s, all {n} {every[name]:.2f} s")
        print(f"  hotswap vs original: median swap {med['hotswap'] / med['original']:.3f}x, "
              f"all {n} {every['hotswap'] / every['original']:.3f}x")
    load_end, _, _ = os.getloadavg()
    print(f"\nload average at the end {load_end:.2f}; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
