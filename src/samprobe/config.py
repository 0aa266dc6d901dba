"""Config: pydantic models loaded from YAML, with typed ``--set key.path=value`` overrides.

Unknown keys and bad values are rejected with the full key path and what is allowed.
Relative paths are resolved against the config file's folder, so a config works from any cwd.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from samprobe.errors import ConfigError


def _not_a_boolean(value: Any) -> Any:
    # pydantic reads True as 1 for numbers; YAML reads yes/no/on/off/true/false as booleans, so
    # `epochs: true` would train one epoch and `seed: yes` use seed 1 without a word.
    if isinstance(value, bool):
        raise ValueError(
            "needs a number, not a yes/no value (YAML reads true/false/yes/no/on/off as booleans)"
        )
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    metadata: Path | None = None
    """CSV / JSONL / Parquet file, one row per image. Omit to read image_root/<class>/<file>."""
    format: Literal["auto", "csv", "jsonl", "parquet", "folder"] = "auto"
    image_root: Path | None = None
    path_column: str = "path"
    label_column: str = "label"
    split_column: str | None = None
    classes_file: Path | None = None
    """Text file, one class name per line: the full taxonomy, including classes with no images."""
    label_type: Literal["auto", "name", "index"] = "auto"
    """How label_column values are read, one rule for the whole file: class names, or 0-based
    indices into classes_file; auto decides from the values and stops when both readings fit."""
    on_bad_rows: Literal["skip", "error"] = "skip"
    max_pixels: Int = Field(default=178_956_970, gt=0)
    val_fraction: Float = Field(default=0.15, ge=0.0, lt=1.0)
    test_fraction: Float = Field(default=0.15, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _something_left_to_train(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction is {self.val_fraction + self.test_fraction:g}: "
                "nothing would be left to train on; keep the sum below 1"
            )
        return self


class BackboneConfig(_Strict):
    name: str = "sam"
    """Registry name: sam (any SAM-family checkpoint, detected) | sam_hq | sam2 | mobile_sam |
    efficientvit_sam | efficientnet_lite0 | timm."""
    checkpoint: Path | None = None
    variant: Literal[
        "auto",
        "vit_b",
        "vit_l",
        "vit_h",
        "hiera_t",
        "hiera_s",
        "hiera_b+",
        "hiera_l",
        "tiny_vit_5m",
        "efficientvit_l0",
        "efficientvit_l1",
        "efficientvit_l2",
        "efficientvit_xl0",
        "efficientvit_xl1",
        "custom",
    ] = "auto"
    """Encoder geometry; auto = read from the weights (a named one is checked against them)."""
    img_size: Int | None = Field(default=None, ge=32)
    """Encoder input size; null = the backbone's native size (SAM 1024, efficientnet_lite0 224)."""
    timm_model: str | None = None
    """timm model name, for name: timm."""


class FeaturesConfig(_Strict):
    cache_dir: Path = Path("cache")
    pooling: list[str] = Field(default_factory=list)
    """Pooled features to store, concatenated; empty = the backbone's default (SAM: neck_avg)."""
    dtype: Literal["float16", "float32"] = "float16"
    spatial: Int | None = Field(default=None, gt=0, le=64)
    """Also store a spatial x spatial token grid per image (for attention heads), in ``dtype``; None = off."""
    batch_size: Int = Field(default=8, gt=0)
    num_workers: Int | Literal["auto"] = "auto"

    @field_validator("num_workers")
    @classmethod
    def _non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v


class SweepConfig(_Strict):
    """Every lr x weight_decay pair is one head, all trained together in one pass; the best on
    validation (train.monitor) is kept. Empty lists = the single train.lr / train.weight_decay."""

    # SGD at train.batch_size 512: a decade apart, as the best lr varies with the features (digits
    # features prefer ~0.5, the 50k synthetic set ~0.05); measured in bench/heads.py
    lrs: list[Float] = Field(default_factory=lambda: [0.05, 0.5])
    """For train.optimizer sgd (the default); with adamw use about [1e-3, 1e-2]."""
    weight_decays: list[Float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    prune_margin: Float | None = Field(default=0.1, ge=0)
    """After each epoch, a head whose best score is more than this below the leading head's
    stops (in units of train.monitor: 0.1 = 10 points of balanced accuracy); null = never."""

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, v: list[float]) -> list[float]:
        if any(not (x > 0) for x in v) or len(set(v)) != len(v):
            raise ValueError("must be distinct positive numbers")
        return v

    @field_validator("weight_decays")
    @classmethod
    def _wds(cls, v: list[float]) -> list[float]:
        if any(not (x >= 0) for x in v) or len(set(v)) != len(v):
            raise ValueError("must be distinct non-negative numbers")
        return v


class TrainConfig(_Strict):
    head: Literal["linear", "mlp", "attentive"] = "linear"
    """linear / mlp on the pooled features; attentive: attention pooling over the token grid
    (needs features.spatial), one learned query, 8 attention heads, then a linear layer."""
    hidden: Int = Field(default=512, gt=0)
    """MLP hidden width."""
    dropout: Float = Field(default=0.0, ge=0.0, lt=1.0)
    epochs: Int = Field(default=100, gt=0)
    batch_size: Int = Field(default=512, gt=0)
    accumulate: Int = Field(default=1, gt=0)
    """Gradient accumulation: one optimizer step every `accumulate` batches."""
    memory_budget_gb: Float | None = Field(default=None, gt=0)
    """Train + val features are held in memory (float32) up to this many GB; a larger set is
    streamed from the cache's shard files in shuffled chunks (the same sweep, resumable bit for
    bit); `evaluate` reads a split over it the same way, a buffer at a time. Unset: half the
    memory available when the stage starts."""
    warmup_epochs: Int = Field(default=5, ge=0)
    """Linear warm-up length (at most 5% of all steps), then cosine decay to 0."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """sgd: Nesterov momentum 0.9 (as DINOv2's linear evaluation; on standardised features it
    matches LogisticRegression's accuracy in a few epochs, bench/heads.py); adamw: Adam(W)."""
    lr: Float = Field(default=0.05, gt=0)
    weight_decay: Float = Field(default=1e-4, ge=0)
    weight_decay_mode: Literal["l2", "decoupled"] = "l2"
    """l2: an L2 term added to the gradient, so training converges to the L2-regularised optimum
    (as LogisticRegression; measured in bench/heads.py to match it where AdamW's decoupled
    decay fell 3-5 points short); decoupled: AdamW's decay."""
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    save_every: Int = Field(default=0, ge=0)
    """Also keep checkpoints/epoch_NNNN.pt every N epochs (0 = only best.pt and last.pt)."""
    keep_checkpoints: Int = Field(default=3, ge=1)
    class_weights: Literal["balanced", "sqrt", "effective_number", "none"] = "balanced"
    monitor: Literal["balanced_accuracy", "accuracy", "macro_f1", "val_loss"] = "balanced_accuracy"
    patience: Int = Field(default=15, ge=1)
    min_delta: Float = Field(default=0.0, ge=0)


class InspectConfig(_Strict):
    """`samprobe inspect`: label issues, near-duplicates / split leakage and outliers from the cached features."""

    folds: int = Field(default=5, ge=2)
    """Cross-fitting folds: each train+val image is scored by a head that never saw it."""
    duplicate_cosine: float = Field(default=0.94, gt=0, le=1)
    """Two images whose pooled features have at least this cosine similarity are candidate
    near-duplicates (1.0: exact feature copies only)."""
    duplicate_margin: float = Field(default=0.05, ge=0, le=2)
    """A candidate is a near-duplicate when its cosine exceeds the two images' mean cosine to their
    `neighbours` nearest by this much (it stands out from its neighbourhood; look-alike classes do
    not), or when its cosine is at least 0.99; 0 = the cosine alone decides."""
    neighbours: int = Field(default=5, ge=1)
    """k of the kNN outlier score (mean cosine distance to the k nearest other images)."""
    outlier_iqr: float = Field(default=3.0, gt=0)
    """An image is an outlier when its kNN distance is above Q3 + outlier_iqr x IQR of all images'."""


class WandbConfig(_Strict):
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "samprobe"
    init_timeout_s: Float = Field(default=15.0, gt=0, le=120)
    """How long wandb may try to reach its server before samprobe falls back to offline."""


class TrackingConfig(_Strict):
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class Config(_Strict):
    run_dir: Path = Path("runs/default")
    seed: Int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inspect: InspectConfig = Field(default_factory=InspectConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _head_has_its_input(self) -> Config:
        check_head_input(self)
        return self

    def resolved_num_workers(self) -> int:
        from samprobe.data.loader import default_num_workers

        nw = self.features.num_workers
        return default_num_workers() if nw == "auto" else int(nw)


def check_head_input(cfg: Config) -> None:
    """ConfigError when train.head attentive has no grid to read (config load, and train start for
    configs edited in Python). A ConfigError, not a ValueError: pydantic passes it through as is."""
    if cfg.train.head == "attentive" and cfg.features.spatial is None:
        raise ConfigError(
            "train.head is attentive but features.spatial is not set: the attentive probe reads "
            "the cached token grid",
            fix="set features.spatial (e.g. 8) and rerun `samprobe extract -c CONFIG` (it "
            "resumes: the pooled "
            "features stay, only the grids are added), or use train.head linear / mlp",
        )


# ---------------------------------------------------------------------------------------
# loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-3`` -> (["train", "lr"], 0.001); the value is read as YAML, so types hold."""
    if "=" not in item:
        raise ConfigError(
            f"--set {item!r} is not key.path=value", fix="write e.g. --set train.lr=0.001"
        )
    key, _, raw = item.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r} has an empty key", fix="write e.g. --set train.lr=0.001")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"--set {item}: {'.'.join(keys[:-1])} is not a section",
                    fix="check the key path with `samprobe init`",
                )
            node = nxt
        node[keys[-1]] = value
    return raw


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def _blamed(loc: tuple[Any, ...], source: str, overrides: list[str]) -> str:
    """The --set item that wrote the value at ``loc`` (the last one wins, as when applied), else the file."""
    for item in reversed(overrides):
        keys = parse_override(item)[0]
        if [str(p) for p in loc[: len(keys)]] == keys:
            return f"--set {item}"
    return source


def _format_validation_error(
    err: ValidationError, source: str, overrides: list[str] = ()
) -> ConfigError:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc)
    source = _blamed(loc, source, list(overrides))
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(Config, loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        hint = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}? " if close else ""
        msg = f"{source}: unknown key {path!r}"
        fix = f"{hint}allowed keys here: {', '.join(allowed)}"
    else:
        got = first.get("input")
        msg = f"{source}: {path}: {first['msg']} (got {got!r})"
        fix = (
            f"give --set {path}= a valid value"
            if source.startswith("--set ")
            else f"set {path} to a valid value in {source} or with --set {path}=..."
        )
    more = len(err.errors()) - 1
    if more:
        msg += f" [and {more} more problem{'s' if more > 1 else ''}]"
    return ConfigError(msg, fix=fix)


def _resolve_paths(model: BaseModel, base: Path) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _resolve_paths(value, base)
        elif isinstance(value, Path):
            value = value.expanduser()
            setattr(model, name, value if value.is_absolute() else (base / value).resolve())


def build_config(
    raw: dict[str, Any], base_dir: Path, source: str = "config", overrides: list[str] = ()
) -> Config:
    """``overrides``: the --set items already applied to ``raw``, so an error names the one at fault."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise _format_validation_error(err, source, overrides) from None
    _resolve_paths(cfg, base_dir)
    return cfg


def load_config(path: Path | str, overrides: list[str] | None = None) -> Config:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"config file {path} is a folder, not a file",
            fix=f"pass the YAML file, e.g. -c {path / 'samprobe.yaml'} (`samprobe init {path}` "
            f"writes one)",
        )
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist",
            fix=f"create one with `samprobe init {path.parent}` or pass the right -c path",
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(
            f"config file {path} cannot be read ({exc.strerror or exc})",
            fix="fix the file's permissions",
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path} is not valid YAML: {exc}", fix="fix the syntax at the position shown"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must hold a mapping of settings, not {type(raw).__name__}",
            fix="start from `samprobe init`",
        )
    raw = apply_overrides(raw, overrides or [])
    return build_config(raw, path.resolve().parent, source=str(path), overrides=overrides or [])


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (absolute paths), written into every run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


TEMPLATE = """\
# samprobe config. Relative paths are resolved against this file's folder.
# Every key can be overridden on the command line: --set train.lr=0.0005
run_dir: runs/exp1            # where checkpoints, metrics, reports go
seed: 0
device: auto                  # auto | cpu | cuda
precision: auto               # auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs >= sm_80, fp16 older GPUs; CPU: probe)

data:
  metadata: data/metadata.csv # csv, jsonl or parquet; omit to use image_root/<class>/<image>
  format: auto                # auto | csv | jsonl | parquet | folder
  image_root: data/images     # paths in the metadata are relative to this folder
  path_column: path
  label_column: label         # class names or integer indices
  split_column: null          # column with train/val/test; null = stratified split by seed
  classes_file: null          # one class per line: the full taxonomy, empty classes included
  label_type: auto            # auto | name | index (0-based into classes_file): one rule for the whole file
  on_bad_rows: skip           # skip (report and go on) | error (stop at the first bad row)
  val_fraction: 0.15          # also carved from train when the split column has no val rows
  test_fraction: 0.15

backbone:
  name: sam                   # sam (SAM 1, SAM-HQ or SAM 2/2.1: read from the file) | efficientnet_lite0 | timm
  checkpoint: weights/sam_vit_b_01ec64.pth  # `samprobe weights list`, `samprobe weights download sam_vit_b`
  # variant: vit_b | vit_l | vit_h (SAM 1, SAM-HQ) | hiera_t | hiera_s | hiera_b+ | hiera_l
  #   (SAM 2/2.1) | tiny_vit_5m (MobileSAM) | efficientvit_l0 ... efficientvit_xl1 (EfficientViT-SAM)
  variant: auto               # auto: read from the weights
  img_size: null              # null = native (SAM 1024); 512/768 trade fidelity for speed

features:
  cache_dir: cache            # extracted features, shared between runs
  pooling: []                 # empty = the 256-d SAM embedding (neck_avg); doctor lists the others (block_avg@6,12...)
  spatial: null               # e.g. 16: also store a 16x16 grid of neck tokens per image (256 x 256 fp16 = 128 KB)
  dtype: float16
  batch_size: 8
  num_workers: auto           # decoding processes; auto = CPU cores (under torchrun: cores / ranks per node)

train:
  head: linear                # linear | mlp (pooled features) | attentive (needs features.spatial, e.g. 8)
  epochs: 100
  batch_size: 512
  accumulate: 1               # gradient accumulation steps
  optimizer: sgd              # sgd (Nesterov momentum) | adamw (then lrs around 0.001-0.01)
  lr: 0.05                    # used when sweep.lrs is empty
  weight_decay: 0.0001        # used when sweep.weight_decays is empty
  sweep:                      # one head per lr x weight_decay, trained together, best kept (sweep.csv)
    lrs: [0.05, 0.5]
    weight_decays: [0.0001, 0.001, 0.01, 0.1]
    prune_margin: 0.1         # a head this far below the leading head's best score stops (null: never)
  weight_decay_mode: l2       # l2 (penalty in the gradient) | decoupled (as AdamW)
  save_every: 0               # also keep epoch_NNNN.pt every N epochs (keep_checkpoints of them)
  class_weights: balanced     # balanced | sqrt | effective_number | none
  monitor: balanced_accuracy  # balanced_accuracy | accuracy | macro_f1 | val_loss
  patience: 15

inspect:                      # samprobe inspect: label issues, near-duplicates / leakage, outliers
  folds: 5                    # cross-fitting folds over train+val
  duplicate_cosine: 0.94      # pooled-feature cosine of a candidate near-duplicate pair
  duplicate_margin: 0.05      # kept if it beats both images' mean kNN cosine by this (or cosine >= 0.99)
  neighbours: 5               # k of the kNN-distance outlier score
  outlier_iqr: 3.0            # outlier: kNN distance above Q3 + 3 IQR

tracking:
  wandb:
    mode: disabled            # online | offline | disabled (metrics.jsonl is always written)
    project: samprobe
    init_timeout_s: 15        # online: fall back to offline (and print `wandb sync ...`) after this
"""
