"""Command line. Each subcommand is a thin wrapper over a library function.

Exit codes: 0 success, 2 user error (one line: what is wrong and the fix), 1 unexpected
failure. Tracebacks only with --debug.
"""

from __future__ import annotations

import os

# Set before torch loads: spinning OpenMP threads burn CPU whenever a partner thread is
# descheduled (a busy or shared CPU); measured 2x CPU time for SAM extraction under load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from samprobe import __version__
from samprobe.errors import SamprobeError, plain_text
from samprobe.logs import setup_console, to_run_logs

log = logging.getLogger("samprobe")


def user_path(text: str) -> str:
    """A path argument with ``~`` expanded as a shell would (quoted '~/x' reaches us unexpanded)."""
    return str(Path(text).expanduser())


def _config(args: argparse.Namespace):  # noqa: ANN202 - returns samprobe.config.Config
    from samprobe.config import load_config

    return load_config(args.config, args.set)


def cmd_demo(args: argparse.Namespace) -> int:
    from samprobe.demo import run_demo

    run_demo(Path(args.out), num_workers=args.num_workers)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from samprobe.config import TEMPLATE
    from samprobe.io import atomic_write_text

    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise SamprobeError(
            f"{args.dir} is a file, not a folder",
            fix="pass a folder for samprobe.yaml (it is created if missing)",
        )
    target = Path(args.dir) / "samprobe.yaml"
    if target.exists() and not args.force:
        raise SamprobeError(
            f"{target} already exists", fix="pass --force to overwrite it, or choose another folder"
        )
    atomic_write_text(target, TEMPLATE)
    log.info(
        f"wrote {target}: edit data.metadata, data.image_root and backbone.checkpoint, then "
        f"`samprobe doctor -c {target}`"
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from samprobe.doctor import run_doctor

    return run_doctor(args.config, args.set)


def cmd_validate(args: argparse.Namespace) -> int:
    from samprobe.pipeline import run_validate

    run_validate(_config(args))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from samprobe.pipeline import run_extract

    run_extract(_config(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from samprobe.pipeline import run_train

    run_train(_config(args), resume=args.resume)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from samprobe.pipeline import run_evaluate

    run_evaluate(_config(args), Path(args.checkpoint), args.split)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from samprobe.predict import run_predict

    if args.top_k < 1:
        raise SamprobeError(f"--top-k must be 1 or more, got {args.top_k}", fix="e.g. --top-k 5")

    run_predict(
        Path(args.checkpoint),
        args.inputs,
        Path(args.out),
        top_k=args.top_k,
        device=args.device,
        image_root=Path(args.image_root) if args.image_root else None,
        weights=Path(args.weights) if args.weights else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from samprobe import serve
    except ModuleNotFoundError as exc:  # fastapi / uvicorn / prometheus-client are the serve extra
        raise SamprobeError(
            f"samprobe serve needs {exc.name}, which is not installed",
            fix="pip install 'samprobe[serve]'",
        ) from None

    settings = serve.ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        workers=args.workers,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels,
        timeout_s=args.timeout_s,
        default_top_k=args.top_k,
        api_key=serve.read_api_key(args.api_key_file) if args.api_key_file else None,
    )
    return serve.serve(
        Path(args.checkpoint),
        host=args.host,
        port=args.port,
        device=args.device,
        settings=settings,
        access_log=args.access_log,
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from samprobe.pipeline import run_inspect

    run_inspect(_config(args))
    return 0


def cmd_features_export(args: argparse.Namespace) -> int:
    from samprobe.pipeline import run_export

    run_export(_config(args), args.split, Path(args.out))
    return 0


def cmd_weights_download(args: argparse.Namespace) -> int:
    from samprobe.backbones.download import checksum_note, download_weights

    path = download_weights(args.name, Path(args.dir), url=args.url)
    log.info(
        f"{args.name}: {path} ({checksum_note(args.name, Path(args.dir))}); set "
        f"backbone.checkpoint: {path}"
    )
    return 0


def cmd_weights_list(args: argparse.Namespace) -> int:
    from samprobe.backbones.download import CATALOGUE

    for name, entry in CATALOGUE.items():
        checksum = (
            f"MD5 {entry.md5}"
            if entry.md5
            else "no checksum published: sha256 recorded on first download"
        )
        print(
            f"{name:22} {entry.family:16} {entry.url}\n{'':39} {checksum}; source: {entry.source}"
        )
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    from samprobe.features.manage import cache_info

    cache_info(_config(args))
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from samprobe.features.manage import cache_verify

    cache_verify(_config(args), repair=args.repair)
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from samprobe.features.manage import cache_prune
    from samprobe.pipeline import load_dataset

    cfg = _config(args)
    records, _ = load_dataset(cfg)  # this run's data, validated again if it changed
    cache_prune(cfg, records=records, all_fingerprints=args.all_fingerprints, dry_run=not args.yes)
    return 0


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        required=True,
        metavar="FILE",
        type=user_path,
        help="samprobe YAML config (see `samprobe init`)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.0005 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samprobe",
        description="Train and evaluate image classifiers on frozen SAM encoder features.",
    )
    parser.add_argument("--version", action="version", version=f"samprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help_: str,
        config: bool = True,
        parent=sub,
    ) -> argparse.ArgumentParser:  # noqa: ANN001
        p = parent.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks for every error",
        )
        if config:
            _add_config(p)
        p.set_defaults(func=fn)
        return p

    p = add(
        "demo",
        cmd_demo,
        "run the whole pipeline on bundled real images (CPU, a few minutes)",
        config=False,
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        type=user_path,
        help="folder for the demo data and run (default: runs/demo)",
    )
    p.add_argument(
        "--num-workers", type=int, default=None, help="decoding processes (default: CPU cores)"
    )
    p = add(
        "init", cmd_init, "write a commented config template to DIR/samprobe.yaml", config=False
    )
    p.add_argument("dir", type=user_path, help="folder for samprobe.yaml")
    p.add_argument("--force", action="store_true", help="overwrite an existing samprobe.yaml")
    add(
        "doctor",
        cmd_doctor,
        "check config, paths, permissions, disk, checkpoint, device before a long run",
    )
    add(
        "validate",
        cmd_validate,
        "read the metadata, check every image; write data_report.json, bad_rows.csv, splits.csv",
    )
    add("extract", cmd_extract, "extract features into the cache (resumable)")
    p = add(
        "train",
        cmd_train,
        "train heads on cached features; write checkpoints/, metrics.jsonl, sweep.csv",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from RUN_DIR/checkpoints/last.pt",
    )
    p = add(
        "evaluate",
        cmd_evaluate,
        "metrics on a split; write eval/<split>/metrics.json, per_class.csv, confusion_matrix.png",
    )
    p.add_argument(
        "--checkpoint", required=True, type=user_path, help="checkpoints/best.pt of a training run"
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    add(
        "inspect",
        cmd_inspect,
        "label issues, near-duplicates / split leakage, outliers from the cached features; "
        "write inspect/*.csv, summary.json, report sections",
    )
    p = add(
        "predict",
        cmd_predict,
        "classify images, folders or a metadata file; write a CSV",
        config=False,
    )
    p.add_argument(
        "--checkpoint", required=True, type=user_path, help="checkpoints/best.pt of a training run"
    )
    p.add_argument(
        "inputs",
        nargs="+",
        type=user_path,
        help="image files, folders, or a metadata csv/jsonl with a path column",
    )
    p.add_argument(
        "--out", required=True, type=user_path, help="output CSV: path, label, score, top_k, error"
    )
    p.add_argument("--top-k", type=int, default=5, help="how many best classes to list (default 5)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--image-root",
        default=None,
        type=user_path,
        help="folder a metadata file's relative paths are under (default: the training "
        "data.image_root)",
    )
    p.add_argument(
        "--weights",
        default=None,
        type=user_path,
        help="backbone weights file, when it moved since training "
        "(default: the training path, else found by name or content next to the checkpoint or in "
        "weights/)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        type=user_path,
        help="keep the features in this cache, e.g. the training features.cache_dir "
        "(default: a temporary cache, removed after; the training cache is never written)",
    )

    p = add(
        "serve",
        cmd_serve,
        "serve a trained head over HTTP with dynamic batching (/predict, /health, /ready, "
        "/info, /metrics)",
        config=False,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoints/best.pt of a training run")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)"
    )
    p.add_argument(
        "--max-batch", type=int, default=16, help="most images per forward pass (default 16)"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long the first image of a batch waits for others (default 10)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="threads that parse and decode request images (default: CPU cores, at most 4)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="most images admitted and not yet answered; past it 503 + Retry-After (default 64)",
    )
    p.add_argument(
        "--max-body-mb", type=float, default=50.0, help="largest request body in MiB (default 50)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="largest image in pixels, checked before decoding (default 40000000)",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=30.0,
        help="deadline of one /predict request (default 30)",
    )
    p.add_argument(
        "--top-k", type=int, default=5, help="top_k when a request gives none (default 5)"
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        help="file holding a token that requests must send as 'Authorization: Bearer <token>'",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--access-log", action="store_true", help="log one line per request")

    feats = sub.add_parser(
        "features",
        help="cached features for use elsewhere",
        description="cached features for use elsewhere",
    )
    feats_sub = feats.add_subparsers(dest="features_command", required=True, metavar="ACTION")
    p = add(
        "export",
        cmd_features_export,
        "write a split's cached features with labels to .npz or .parquet",
        parent=feats_sub,
    )
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"])
    p.add_argument("--out", required=True, type=user_path, help="output file, .npz or .parquet")

    weights = sub.add_parser(
        "weights", help="official SAM-family weights", description="official SAM-family weights"
    )
    weights_sub = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    add(
        "list",
        cmd_weights_list,
        "every downloadable checkpoint: family, official URL, checksum and its source",
        config=False,
        parent=weights_sub,
    )
    p = add(
        "download",
        cmd_weights_download,
        "download official weights: resumable, checksum-verified, atomic",
        config=False,
        parent=weights_sub,
    )
    p.add_argument(
        "name",
        help="a name from `samprobe weights list` (e.g. sam_vit_b, sam2.1_hiera_tiny, mobile_sam)",
    )
    p.add_argument(
        "--dir", default="weights", type=user_path, help="destination folder (default: ./weights)"
    )
    p.add_argument(
        "--url",
        default=None,
        help="download from this mirror instead (the official MD5 is still checked)",
    )

    cache = sub.add_parser(
        "cache",
        help="inspect, verify and prune the feature cache",
        description="inspect, verify and prune the feature cache",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    add(
        "info",
        cmd_cache_info,
        "sizes and origin of every fingerprint under features.cache_dir",
        parent=cache_sub,
    )
    p = add(
        "verify",
        cmd_cache_verify,
        "recompute every shard checksum; exit 2 if any entry is corrupt",
        parent=cache_sub,
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="drop corrupt entries from the index (extract redoes them)",
    )
    p = add(
        "prune",
        cmd_cache_prune,
        "report (and with --yes remove) entries of images no run using the cache lists",
        parent=cache_sub,
    )
    p.add_argument(
        "--all-fingerprints",
        action="store_true",
        help="prune every fingerprint, not only this config's",
    )
    p.add_argument(
        "--yes",
        action="store_true",
        help="remove the entries (without it: a dry run, counts and bytes only)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="only report what would be removed (the default)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    setup_console(debug)
    try:
        return int(args.func(args) or 0)
    except SamprobeError as exc:
        if debug:
            traceback.print_exc()
        fix = f" Fix: {exc.fix}" if exc.fix else ""
        # one line, whatever a wrapped library message holds (torch.load's spans a page)
        line = " ".join(plain_text(f"samprobe: error [{exc.code}]: {exc.message}.{fix}").split())
        print(line, file=sys.stderr)
        to_run_logs(logging.ERROR, line)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "samprobe: interrupted (completed work is saved: rerun extract to resume it, or train "
            "with --resume)",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # a bug: say so, keep the traceback one flag away
        if debug:
            traceback.print_exc()
        line = plain_text(
            f"samprobe: unexpected error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback; please report it)"
        )
        print(line, file=sys.stderr)
        to_run_logs(logging.ERROR, line)
        return 1
