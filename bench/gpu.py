"""The GPU check: extraction throughput, torch.compile, the OOM split, torchrun and head training on CUDA.

Run from the repo root on a GPU machine (about 6 minutes on one H100/H200):

    PYTHONPATH=src python bench/gpu.py
    PYTHONPATH=src python bench/gpu.py --dry-run     # the same code paths on the CPU, tiny sizes, < 1 min

Sections (each one times itself; one that fails records its error and the rest still run):
- extract: vit_b and vit_h at 1024 px, bf16, batch 1/8/32. The official ``SamPredictor`` loop
  (one image per ``set_image``, under bf16 autocast), timm's ``VisionTransformerSAM`` (bf16,
  timm's fused SDPA attention with the dense rel-pos mask) and samprobe's ``Extractor.run``
  with its loader (files decoded by workers, cache writes included), img/s each and the
  ratios, from one run on the same random weights (official format) and the same real
  photos (skimage.data crops).
- compile: samprobe's trunk with ``torch.compile`` against eager, vit_b batch 8.
- oom: a small ``torch.cuda.set_per_process_memory_fraction`` makes a batch not fit; the run
  must split it and finish with the same features as an unconstrained run.
- torchrun: ``torchrun --nproc_per_node=1 -m samprobe extract`` end to end.
- heads: a sweep of 8 heads on 50k x 1280 features on the GPU, s/epoch.

``--dry-run`` runs every section on the CPU: the tiny SAM geometry at 256 px, batches 1/2,
torch.compile with the ``eager`` backend (dynamo's capture, no code generation: no compiler
toolchain and seconds, not minutes), an out-of-memory error injected for batches above 2
(the CPU has no memory fraction), 2k x 64 features for the heads. Targets are checked only on
a GPU. Ends with one JSON line; exit 1 when a section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # helpers.sam_factory: official-format weights

TARGETS = {"vit_h_img_s": 60.0, "vit_b_img_s": 200.0, "vs_timm": 1.5, "vs_official": 5.0}
BUDGET_S = 480  # the 8 minutes: sections left when it is spent are skipped, and say so


class Plan:
    """Sizes of one run: the GPU plan, or the dry run's tiny one."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.variants = ["tiny"] if dry_run else ["vit_b", "vit_h"]
        self.img_size = 256 if dry_run else 1024
        self.batches = [1, 2] if dry_run else [1, 8, 32]
        self.official_images = 2 if dry_run else 24
        self.compile_backend = "eager" if dry_run else "inductor"
        self.compile_variant, self.compile_batch = ("tiny", 2) if dry_run else ("vit_b", 8)
        self.heads_shape = (2_000, 64) if dry_run else (50_000, 1280)
        self.heads_epochs = 2 if dry_run else 5
        self.workers = 0 if dry_run else min(8, len(os.sched_getaffinity(0)))

    def images_for(self, batch: int) -> int:
        return 2 * batch if self.dry_run else max(48, 6 * batch)


# --- inputs ---------------------------------------------------------------------------------------


def photo_files(root: Path, n: int) -> list[Path]:
    """``n`` distinct JPEGs: crops of the skimage photos at several offsets (distinct bytes: distinct cache keys)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.cat()]
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        dy, dx = (i * 7) % (h // 4), (i * 13) % (w // 4)
        crop = np.ascontiguousarray(p[dy : dy + 3 * h // 4, dx : dx + 3 * w // 4, :3])
        f = root / f"img_{i:04d}.jpg"
        Image.fromarray(crop).save(f, quality=92)
        files.append(f)
    return files


def records(files: list[Path]) -> list[Any]:
    from samprobe.data.records import Record
    from samprobe.io import sha256_file

    return [
        Record(i, f.name, str(f), "photo", "train", sha256_file(f)) for i, f in enumerate(files)
    ]


def decoded(files: list[Path]) -> list[np.ndarray]:
    from samprobe.data.images import decode_rgb

    return [decode_rgb(f) for f in files]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- contenders
# -------------------------------------------------------------------------------------


def official_rate(sam: Any, images: list[np.ndarray], device: torch.device) -> float:
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam.to(device))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        predictor.set_image(images[0])  # warm-up
        sync(device)
        t = time.perf_counter()
        for img in images:  # the official API takes one image at a time
            predictor.set_image(img)
        sync(device)
    sam.to("cpu")
    return len(images) / (time.perf_counter() - t)


def timm_model(
    geometry: str, state_dict: dict[str, torch.Tensor], size: int, device: torch.device
) -> torch.nn.Module:
    from functools import partial

    from timm.models.vision_transformer_sam import VisionTransformerSAM, checkpoint_filter_fn

    from helpers.sam_factory import GEOMETRIES

    embed, depth, heads, global_idx = GEOMETRIES[geometry]
    model = VisionTransformerSAM(
        img_size=size,
        patch_size=16,
        embed_dim=embed,
        depth=depth,
        num_heads=heads,
        global_attn_indexes=global_idx,
        window_size=14,
        use_rel_pos=True,
        neck_chans=256,
        num_classes=0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return model.to(device)


def timm_rate(
    model: torch.nn.Module, images: list[np.ndarray], batch: int, size: int, device: torch.device
) -> float:
    from samprobe.data.images import letterbox, sam_normalize_pad

    # host-side resize is not timed: the model is
    prepared = [letterbox(img, size) for img in images]
    groups = [prepared[i : i + batch] for i in range(0, len(prepared), batch)]

    def run(group: list) -> None:
        x = torch.stack([p[0] for p in group]).to(device, non_blocking=True)
        hw = torch.tensor([p[1] for p in group])
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model.forward_features(sam_normalize_pad(x, hw))

    run(groups[0])  # warm-up
    sync(device)
    t = time.perf_counter()
    for g in groups:
        run(g)
    sync(device)
    return len(prepared) / (time.perf_counter() - t)


def samprobe_extractor(ckpt: Path, plan: Plan, precision: str = "bf16") -> Any:
    from samprobe.config import BackboneConfig, Config
    from samprobe.features.extract import Extractor

    cfg = Config(
        device=plan.device.type,
        precision=precision,
        backbone=BackboneConfig(name="sam", checkpoint=ckpt, img_size=plan.img_size),
    )
    return Extractor.from_config(cfg)


def samprobe_rate(
    extractor: Any, files: list[Path], batch: int, plan: Plan, cache_root: Path
) -> float:
    """img/s of ``Extractor.run``: loader workers, device work and cache commits (after a warm-up run)."""
    from samprobe.features.cache import FeatureCache

    with FeatureCache(cache_root / f"warm{batch}", "fp", extractor.dim, "float16") as cache:
        extractor.run(
            records(files[:batch]),
            cache,
            batch_size=batch,
            num_workers=plan.workers,
            progress=False,
        )
    with FeatureCache(cache_root / f"b{batch}", "fp", extractor.dim, "float16") as cache:
        result = extractor.run(
            records(files), cache, batch_size=batch, num_workers=plan.workers, progress=False
        )
    assert result.extracted == len(files) and not result.failures, result.failures[:2]
    return result.extracted / result.seconds


# --- sections
# ---------------------------------------------------------------------------------------


def section_extract(plan: Plan, work: Path) -> dict[str, Any]:
    from helpers.sam_factory import build_official_sam

    out: dict[str, Any] = {}
    files = photo_files(work / "photos", max(plan.images_for(b) for b in plan.batches))
    for variant in plan.variants:
        sam = build_official_sam(variant, img_size=plan.img_size)
        ckpt = work / f"sam_{variant}.pth"
        torch.save(sam.state_dict(), ckpt)
        official = official_rate(sam, decoded(files[: plan.official_images]), plan.device)
        row: dict[str, Any] = {"official_img_s": round(official, 2)}
        encoder_sd = {k: v for k, v in sam.state_dict().items() if k.startswith("image_encoder.")}
        del sam
        timm = timm_model(variant, encoder_sd, plan.img_size, plan.device)
        extractor = samprobe_extractor(ckpt, plan)
        for batch in plan.batches:
            n = plan.images_for(batch)
            t_rate = timm_rate(timm, decoded(files[:n]), batch, plan.img_size, plan.device)
            s_rate = samprobe_rate(extractor, files[:n], batch, plan, work / f"cache_{variant}")
            row[f"batch_{batch}"] = {
                "timm_img_s": round(t_rate, 2),
                "samprobe_img_s": round(s_rate, 2),
                "vs_timm": round(s_rate / t_rate, 2),
                "vs_official": round(s_rate / official, 2),
            }
            print(f"  extract {variant} batch {batch}: {row[f'batch_{batch}']}", flush=True)
        del timm, extractor
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
        out[variant] = row
    return out


def section_compile(plan: Plan, work: Path) -> dict[str, Any]:
    """samprobe's trunk compiled against eager, same weights and batches (no loader: the kernels are compared)."""
    from helpers.sam_factory import write_official_checkpoint

    variant = plan.compile_variant
    ckpt = write_official_checkpoint(
        work / f"compile_{variant}.pth", variant, img_size=plan.img_size
    )
    extractor = samprobe_extractor(ckpt, plan)
    files = photo_files(work / "photos", plan.compile_batch * (2 if plan.dry_run else 4))
    from samprobe.data.images import letterbox

    prepared = [letterbox(img, plan.img_size) for img in decoded(files)]
    groups = [
        (
            torch.stack([p[0] for p in prepared[i : i + plan.compile_batch]]),
            torch.tensor([p[1] for p in prepared[i : i + plan.compile_batch]]),
        )
        for i in range(0, len(prepared), plan.compile_batch)
    ]

    def rate() -> tuple[float, np.ndarray]:
        extractor.encode_batch(*groups[0])  # warm-up (compiles on the first call)
        sync(plan.device)
        t = time.perf_counter()
        feats = [extractor.encode_batch(*g) for g in groups]
        sync(plan.device)
        return len(prepared) / (time.perf_counter() - t), np.concatenate(feats)

    eager, ref = rate()
    bb = extractor.backbone
    eager_trunk = bb.trunk
    t = time.perf_counter()
    bb.trunk = torch.compile(eager_trunk, backend=plan.compile_backend, dynamic=False)
    compiled, feats = rate()
    compile_s = time.perf_counter() - t - len(prepared) / compiled
    bb.trunk = eager_trunk
    cos = float(
        np.min(
            np.sum(ref * feats, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(feats, axis=1))
        )
    )
    return {
        "backend": plan.compile_backend,
        "eager_img_s": round(eager, 2),
        "compiled_img_s": round(compiled, 2),
        "speedup": round(compiled / eager, 3),
        "compile_s": round(compile_s, 1),
        "min_cosine": round(cos, 5),
        "helps": compiled > 1.05 * eager and cos >= 0.999,
    }


class _InjectedOom:
    """The dry run's stand-in for a memory limit: batches above ``limit`` raise CUDA's OOM error."""

    def __init__(self, backbone: Any, limit: int) -> None:
        self.backbone, self.limit, self.calls = backbone, limit, []
        self.real = backbone.encode

    def __call__(self, images: torch.Tensor, *args: Any) -> torch.Tensor:
        self.calls.append(int(images.shape[0]))
        if images.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory (injected by bench/gpu.py --dry-run)"
            )
        return self.real(images, *args)


def section_oom(plan: Plan, work: Path) -> dict[str, Any]:
    from helpers.sam_factory import write_official_checkpoint
    from samprobe.features.cache import FeatureCache

    variant = "tiny" if plan.dry_run else "vit_b"
    ckpt = write_official_checkpoint(work / f"oom_{variant}.pth", variant, img_size=plan.img_size)
    batch = 4 if plan.dry_run else 32
    files = photo_files(work / "photos", batch)
    recs = records(files)
    reference = samprobe_extractor(ckpt, plan)
    with FeatureCache(work / "oom_ref", "fp", reference.dim, "float32") as cache:
        reference.run(recs, cache, batch_size=batch, num_workers=0, progress=False)
        ref = cache.get([r.sha256 for r in recs])
    del reference
    limited = samprobe_extractor(ckpt, plan)
    info: dict[str, Any] = {"batch": batch}
    if plan.dry_run:
        limited.backbone.encode = _InjectedOom(limited.backbone, 2)
        info["forced_by"] = "injected OutOfMemoryError above batch 2 (CPU)"
    else:
        # Room for the weights plus about a quarter of what one full batch needs: the batch must
        # split.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the reference run's cached blocks would count against the limit
        torch.cuda.reset_peak_memory_stats()
        limited.encode_batch(*_one_batch(files[:4], plan.img_size))
        per_4 = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = (torch.cuda.memory_allocated() + 2 * per_4) / total
        torch.cuda.set_per_process_memory_fraction(fraction)
        info["forced_by"] = f"set_per_process_memory_fraction({fraction:.4f})"
    try:
        with FeatureCache(work / "oom_split", "fp", limited.dim, "float32") as cache:
            result = limited.run(recs, cache, batch_size=batch, num_workers=0, progress=False)
            got = cache.get([r.sha256 for r in recs])
    finally:
        if not plan.dry_run:
            torch.cuda.set_per_process_memory_fraction(1.0)
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    info.update(
        split_to=limited.max_batch,
        extracted=result.extracted,
        max_abs_diff=float(np.abs(ref - got).max()),
        min_cosine=round(float(cos.min()), 6),
    )
    info["ok"] = bool(
        result.extracted == len(recs)
        and limited.max_batch is not None
        and limited.max_batch < batch
        and cos.min() >= 0.999
    )
    return info


def _one_batch(files: list[Path], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from samprobe.data.images import letterbox

    prepared = [letterbox(img, size) for img in decoded(files)]
    return torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])


def section_torchrun(plan: Plan, work: Path) -> dict[str, Any]:
    import yaml

    from helpers.sam_factory import write_official_checkpoint

    variant = "tiny" if plan.dry_run else "vit_b"
    ckpt = write_official_checkpoint(
        work / f"torchrun_{variant}.pth", variant, img_size=plan.img_size
    )
    images = work / "torchrun_images"
    for i, f in enumerate(photo_files(work / "photos", 6 if plan.dry_run else 64)):
        (images / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        (images / ("a" if i % 2 else "b") / f.name).write_bytes(f.read_bytes())
    cfg = work / "torchrun.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(work / "torchrun_run"),
                "device": plan.device.type,
                "precision": "auto",
                "data": {
                    "image_root": str(images),
                    "format": "folder",
                    "val_fraction": 0.2,
                    "test_fraction": 0.2,
                },
                "backbone": {"name": "sam", "checkpoint": str(ckpt), "img_size": plan.img_size},
                "features": {
                    "cache_dir": str(work / "torchrun_cache"),
                    "batch_size": 8,
                    "num_workers": plan.workers,
                },
            }
        )
    )
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t = time.perf_counter()
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "samprobe",
        "extract",
        "-c",
        str(cfg),
    ]
    p = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    summary = [ln for ln in p.stdout.splitlines() if "extract:" in ln]
    if p.returncode != 0:
        raise RuntimeError(
            f"torchrun extract exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"
        )
    return {"rc": p.returncode, "wall_s": round(time.perf_counter() - t, 1), "summary": summary}


def section_heads(plan: Plan, work: Path) -> dict[str, Any]:
    from samprobe.config import SweepConfig, TrainConfig
    from samprobe.train.loop import SweepTrainer

    n, d = plan.heads_shape
    classes = 10
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, d)).astype(np.float32)
    x = (centers[y] + 2.0 * rng.normal(size=(n, d))).astype(np.float32)
    split = n * 4 // 5
    cfg = TrainConfig(
        epochs=plan.heads_epochs,
        patience=plan.heads_epochs,
        batch_size=512,
        sweep=SweepConfig(lrs=[0.01, 0.03, 0.1, 0.3], weight_decays=[0.0, 1e-4]),
    )
    precision = "auto" if plan.device.type == "cuda" else "fp32"
    trainer = SweepTrainer(
        x[:split],
        y[:split],
        x[split:],
        y[split:],
        class_weights=np.ones(classes),
        cfg=cfg,
        seed=0,
        device=plan.device,
        precision=precision,
    )
    sync(plan.device)
    t = time.perf_counter()
    result = trainer.run()
    sync(plan.device)
    seconds = time.perf_counter() - t
    return {
        "heads": len(trainer.grid),
        "shape": [n, d],
        "epochs": trainer.epoch,
        "precision": trainer.precision,
        "s_per_epoch": round(seconds / max(trainer.epoch, 1), 3),
        "best_val_balanced_accuracy": round(
            float(result.table[result.best_index]["val_balanced_accuracy"]), 4
        ),
    }


SECTIONS: dict[str, Callable[[Plan, Path], dict[str, Any]]] = {
    "extract": section_extract,
    "compile": section_compile,
    "oom": section_oom,
    "torchrun": section_torchrun,
    "heads": section_heads,
}


def verdict(report: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Targets (GPU only): vit_h >= 60 and vit_b >= 200 img/s at batch 32, samprobe >= 1.5x timm and >= 5x official."""
    if plan.dry_run or "vit_b" not in report.get("extract", {}):
        return {}
    ext = report["extract"]
    best = {v: max(ext[v][f"batch_{b}"]["samprobe_img_s"] for b in plan.batches) for v in ext}
    checks = {
        "vit_h_img_s": best.get("vit_h", 0.0) >= TARGETS["vit_h_img_s"],
        "vit_b_img_s": best.get("vit_b", 0.0) >= TARGETS["vit_b_img_s"],
        "vs_timm": all(ext[v]["batch_32"]["vs_timm"] >= TARGETS["vs_timm"] for v in ext),
        "vs_official": all(
            ext[v]["batch_32"]["vs_official"] >= TARGETS["vs_official"] for v in ext
        ),
    }
    return {"best_samprobe_img_s": best, "targets": TARGETS, "met": checks}


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info.update(threads=torch.get_num_threads(), load_avg_1min=round(os.getloadavg()[0], 2))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dry-run", action="store_true", help="every section on the CPU with tiny sizes (< 1 min)"
    )
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections only")
    args = ap.parse_args(argv)
    plan = Plan(args.dry_run)
    if not plan.dry_run and not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu", "error": "no CUDA GPU visible; use --dry-run on a CPU"}))
        return 1
    start = time.perf_counter()
    report: dict[str, Any] = {"bench": "gpu", "dry_run": plan.dry_run, **device_info(plan.device)}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="samprobe-gpu-bench-") as tmp:
        for name, run in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            if time.perf_counter() - start > BUDGET_S:
                report[name] = {"skipped": f"time budget of {BUDGET_S} s spent"}
                continue
            t = time.perf_counter()
            print(f"{name} ...", flush=True)
            try:
                report[name] = {
                    **run(plan, Path(tmp)),
                    "section_s": round(time.perf_counter() - t, 1),
                }
            except (
                Exception
            ) as exc:  # the JSON line must come out: a failed section is reported, not fatal
                traceback.print_exc()
                errors[name] = (
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                )
    report["verdict"] = verdict(report, plan)
    report["errors"] = errors
    report["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))
    return 1 if errors or (report["oom"].get("ok") is False if "oom" in report else False) else 0


if __name__ == "__main__":
    sys.exit(main())
