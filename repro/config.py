"""Typed run configuration: frozen dataclasses and the strict ``--set key=value`` override parser.

Every knob of a run lives in one of the dataclasses below; a method's own knobs live in its
``<Name>Config`` (see :mod:`repro.method`). Overrides are dotted paths (``train.batch_size=256``,
``method.mask_ratio=0.8``); an unknown key or a value of the wrong type is a :class:`ConfigError`
naming the key, never a silent no-op.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
import warnings
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Union

from repro.budget import Budget, BudgetError, parse_budget


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "vit_base_patch16_224"
    """timm model name passed to ``timm.create_model`` (stock VisionTransformer)."""
    img_size: int | None = None
    """Input resolution; None keeps the timm default (224)."""
    patch_size: int | None = None
    """Patch size override (e.g. 4 for 32-px data); None keeps the name's value."""
    depth: int | None = None
    """Number of blocks override (small recipes only); None keeps the name's value."""
    drop_path_rate: float = 0.0
    """Stochastic depth during pre-training (0 in MAE/MiCL pre-training)."""

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` that rebuild this exact architecture."""
        kw: dict[str, Any] = {"num_classes": 0}
        if self.img_size is not None:
            kw["img_size"] = self.img_size
        if self.patch_size is not None:
            kw["patch_size"] = self.patch_size
        if self.depth is not None:
            kw["depth"] = self.depth
        return kw


BUILTIN_DATA_VERSION = 2
"""Version of the built-in generator (``repro.data.make_shapes``), part of the config hash of built-in runs.
2: colours and lighting from sets shared by every class (issue 16); 1: per-image random colours."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str | None = None
    """Dataset root (ImageFolder with train/ and val/ or test/, or CIFAR pickles); None = built-in shapes."""
    builtin_train: int = 5_000
    """Training images of the built-in procedural dataset."""
    builtin_test: int = 1_000
    """Test images of the built-in procedural dataset."""
    builtin_seed: int = 0
    """Seed of the built-in dataset (train uses it, test uses it + 1); fixed so every run sees the same data."""
    in_memory: str = "auto"
    """'auto' decodes small-image datasets (<= 64 px) once to a uint8 tensor; 'yes' forces it; 'no' streams."""
    num_workers: int = -1
    """DataLoader workers for the streaming (ImageFolder at full resolution) path; -1 = the cores this process may
    use, divided by the processes on the node, less one (``repro.sources.auto_workers``)."""
    decode: str = "fast"
    """How streamed images are decoded (``repro.sources``): 'fast' (reduced-DCT decode, uint8 crops, augmentation on
    the device), 'pil' (the plain torchvision pipeline) or 'gpu' (batched nvJPEG decode on the training device)."""
    bad_images: str = "skip"
    """Corrupt/unreadable image policy: 'skip' (count and warn) or 'fail'."""

    def __post_init__(self) -> None:
        if self.in_memory not in ("auto", "yes", "no"):
            raise ConfigError(f"data.in_memory must be auto|yes|no, got {self.in_memory!r}")
        if self.decode not in ("fast", "pil", "gpu"):
            raise ConfigError(f"data.decode must be fast|pil|gpu, got {self.decode!r}")
        if self.bad_images not in ("skip", "fail"):
            raise ConfigError(f"data.bad_images must be skip|fail, got {self.bad_images!r}")
        if self.builtin_train < 1 or self.builtin_test < 1:
            raise ConfigError("data.builtin_train and data.builtin_test must be positive")


PRECISIONS = ("auto", "fp32", "bf16")
"""Values of ``train.precision`` (``repro.precision.PRECISIONS``; repeated so this module needs no torch)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    batch_size: int | None = None
    """Global batch over all processes; None = the method's paper batch."""
    base_lr: float | None = None
    """Base learning rate (scaled by batch/256 unless the method's lr is absolute); None = paper value."""
    weight_decay: float | None = None
    """AdamW weight decay; None = paper value."""
    warmup_fraction: float | None = None
    """Fraction of total steps spent in linear warmup; None = paper warmup_epochs / epochs."""
    min_lr: float | None = None
    """Floor of the cosine schedule; None = paper value."""
    clip_grad: float | None = None
    """Global gradient-norm clip; None = no clipping (MAE and MiCL do not clip)."""
    optimizer: str = "adamw"
    """'adamw' (fused on CUDA, foreach on CPU) or 'lars'."""
    log_every: int = 20
    """Steps between metric lines (the only host syncs of the loop)."""
    ckpt_every_s: float = 600.0
    """Seconds between periodic checkpoints (one is always written at the end)."""
    precision: str = "auto"
    """'auto', 'fp32' or 'bf16' (autocast; losses keep fp32 logits). 'auto' is bf16 on CUDA and fp32 on CPU; on a
    CPU with native bf16 it becomes bf16 once ``repro.precision.CPU_AUTO_BF16`` is on. Replaces ``train.amp``
    (``amp=false`` is ``precision=fp32``, ``amp=true`` is ``auto``; the old key is still accepted by ``--set``)."""
    compile: bool = False
    """Wrap the method in torch.compile."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    tensorboard: bool = False
    """Also log every metrics.jsonl value, and the evaluations as they land, to RUN_DIR/tensorboard (rank 0;
    needs the ``tensorboard`` extra). ``repro.run --log tensorboard`` sets it."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "lars"):
            raise ConfigError(f"train.optimizer must be adamw|lars, got {self.optimizer!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("train.batch_size must be positive")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError("train.warmup_fraction must be in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto|cpu|cuda, got {self.device!r}")
        if self.log_every < 1:
            raise ConfigError("train.log_every must be >= 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be {'|'.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    spec: Budget = Budget("time", 180.0, "3m")
    """Pre-training budget per method: 90s, 3m, 2h, 2d (wall-clock), 300ep, 5000steps, 2e18flop. Parsed once, as it
    is set (``--budget``, ``--set budget.spec=``; :func:`coerce`); stored and hashed as the text the user gave."""
    calib_warmup_steps: int = 2
    """Untimed steps before calibration (allocator, autotuning, compile)."""
    calib_min_steps: int = 5
    """Fewest timed calibration steps."""
    calib_max_fraction: float = 0.05
    """Calibration stops adding steps once it has used this fraction of a wall-clock budget."""


@dataclass(frozen=True)
class EvalValues:
    """A run's ``eval.*`` values as the recipe and ``--set`` gave them. The core does not know the evaluations:
    each owns a typed settings dataclass beside its ``run`` (registered in ``evals.registry``), which coerces and
    checks these values (``evals.registry.eval_settings``; ``repro.run`` does so before anything starts)."""

    items: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.items)

    def set(self, key: str, value: Any) -> EvalValues:
        return EvalValues(tuple(sorted({**self.as_dict(), key: value}.items())))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one pre-training run of one method depends on."""

    method: str
    method_cfg: Any
    """The method's own frozen ``<Name>Config``."""
    recipe: str = "in1k"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalValues = field(default_factory=EvalValues)
    seed: int = 0

    _SECTIONS = ("model", "data", "train", "budget", "eval")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "recipe": self.recipe, "seed": self.seed,
                             "method_cfg": _asdict(self.method_cfg)}
        for name in self._SECTIONS:
            d[name] = self.eval.as_dict() if name == "eval" else _asdict(getattr(self, name))
        d["budget"]["spec"] = self.budget.spec.text  # as the user wrote it (config.json, the hash)
        return d

    def train_device(self) -> str:
        """The device type ``train.device`` gives on this machine ('auto': CUDA when available), as
        ``repro.distributed.init`` picks it."""
        if self.train.device != "auto":
            return self.train.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self, device_type: str | None = None) -> str:
        """``train.precision`` resolved to 'fp32' or 'bf16' on ``device_type`` (default: :meth:`train_device`)."""
        import torch

        from repro.precision import resolve_precision

        return resolve_precision(self.train.precision, torch.device(device_type or self.train_device()))

    def variant(self) -> str:
        """How this run's method, model and training settings differ from its recipe's as the code now builds it (the
        ``--set`` changes that alter the numbers): ``key=value`` items, sorted and comma-joined (method fields bare,
        the others as ``model.x`` / ``train.x``); '' for the recipe as it is. The training precision has its own
        column and is left out, and so is the export a prerequisite stage trains for the run (MimCo's ``teacher``:
        a path per run, not a setting). Records carry it, and tables and claims keep a variant's rows apart from the
        recipe's (``micl[augment=none]``)."""
        from repro.recipes import build_config
        from repro.registry import METHODS

        mine, base = self.hash_inputs(), build_config(self.method, self.recipe).hash_inputs()
        prerequisite = METHODS[self.method].prerequisite
        items = []
        for section, prefix in (("method_cfg", ""), ("model", "model."), ("train", "train.")):
            a, b = mine.get(section) or {}, base.get(section) or {}
            for k in sorted(set(a) | set(b)):
                if (section == "train" and k in ("amp", "precision")) or (
                        section == "method_cfg" and prerequisite is not None and k == prerequisite.config_field):
                    continue
                if a.get(k) != b.get(k):
                    v = a.get(k)
                    items.append(f"{prefix}{k}=" + ("/".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)))
        return ",".join(items)

    def config_hash(self) -> str:
        """Hash of everything that changes the numbers (not logging/checkpoint cadence or worker count): of
        :meth:`hash_inputs`."""
        blob = json.dumps(self.hash_inputs(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def hash_inputs(self) -> dict[str, Any]:
        """What :meth:`config_hash` hashes: :meth:`to_dict` less what does not change the numbers.

        The precision enters as the run will *resolve* it on this machine (``auto`` is not a precision), in the form
        that keeps every hash from before ``train.precision``: those held ``train.amp`` (true unless a run turned
        autocast off, which only changed CUDA runs). So fp32 on CPU and bf16 on CUDA hash as ``amp: true`` (as
        before), fp32 on CUDA as ``amp: false`` (as ``train.amp=false`` did), and only bf16 on CPU, which did not
        exist, adds ``precision: bf16``: a bf16 CPU run never shares a run directory with an fp32 one. (A CPU run that
        set ``train.amp=false``, fp32 like every CPU run, now shares the default's hash.)
        """
        d = self.to_dict()
        for noise in ("log_every", "ckpt_every_s", "device", "tensorboard"):
            d["train"].pop(noise, None)
        d["train"].pop("precision", None)
        dev, precision = self.train_device(), self.resolved_precision()
        d["train"]["amp"] = not (dev == "cuda" and precision == "fp32")
        if dev != "cuda" and precision == "bf16":
            d["train"]["precision"] = "bf16"
        d["data"].pop("num_workers", None)
        if d["data"].get("decode") == "fast" or d["data"].get("path") is None:
            d["data"].pop("decode", None)  # the default (and irrelevant to built-in data): hashes of older runs hold
        d.pop("eval", None)  # evals are keyed separately; the pretraining run is the same
        # method fields added after runs were published: at their default they leave those runs' hashes as they were
        later = getattr(self.method_cfg, "added_after_publication", {})
        for name, default in later.items():
            if d["method_cfg"].get(name) == default:
                d["method_cfg"].pop(name)
        if d["data"].get("path") is None:  # a new built-in generator is new data: runs of the old one do not resume
            d["data"]["builtin_version"] = BUILTIN_DATA_VERSION
        return d


def _asdict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


# ----------------------------------------------------------------------------------------- overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the CLI or a Python value from a recipe) to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return coerce(value, real[0], key)
        for arg in real:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: cannot use {value!r} as {' | '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        (elem, *rest) = typing.get_args(tp)
        items = value if isinstance(value, (tuple, list)) else [v for v in str(value).strip("()[] ").split(",") if v]
        return tuple(coerce(v.strip() if isinstance(v, str) else v, elem, key) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is Budget:  # the one place a budget string is parsed (repro.budget)
        return value if isinstance(value, Budget) else parse_budget(str(value))
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _replace_field(obj: Any, path: list[str], value: Any, full_key: str) -> Any:
    if not is_dataclass(obj):
        raise ConfigError(f"unknown key {full_key!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    head = path[0]
    if head not in names or head.startswith("_"):
        section = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        raise ConfigError(f"unknown key {full_key!r}; valid keys{' under ' + section if section else ''}: "
                          f"{', '.join(n for n in names if not n.startswith('_'))}")
    if len(path) == 1:
        try:
            return replace(obj, **{head: coerce(value, hints[head], full_key)})  # type: ignore[type-var]
        except (ConfigError, BudgetError):  # a budget's message names --budget and the text, as the user typed it
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{full_key}: {e}") from None
    return replace(obj, **{head: _replace_field(getattr(obj, head), path[1:], value, full_key)})  # type: ignore[type-var]


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply dotted ``key -> value`` overrides strictly (unknown keys and bad types raise ConfigError)."""
    for key, value in overrides.items():
        if key == "train.amp":  # the key train.precision replaced: amp on = auto (bf16 on CUDA), off = fp32
            key, value = "train.precision", "auto" if coerce(value, bool, key) else "fp32"
            warnings.warn("train.amp is deprecated: use train.precision=auto|fp32|bf16", DeprecationWarning,
                          stacklevel=2)
        parts = key.split(".")
        if parts[0] == "method":
            if len(parts) < 2:
                raise ConfigError("'method' needs a field, e.g. method.mask_ratio=0.8")
            try:
                new_m = _replace_field(cfg.method_cfg, parts[1:], value, key)
            except ConfigError as e:
                raise ConfigError(f"{e} (method {cfg.method})") from None
            cfg = replace(cfg, method_cfg=new_m)
        elif parts[0] == "seed" and len(parts) == 1:
            cfg = replace(cfg, seed=coerce(value, int, key))
        elif parts[0] == "eval":  # typed and checked by the evaluation that owns the key (evals.registry)
            if len(parts) != 2 or not parts[1]:
                raise ConfigError(f"unknown key {key!r}; evaluation keys are eval.<setting>, e.g. eval.knn_k=20")
            cfg = replace(cfg, eval=cfg.eval.set(parts[1], value))
        elif parts[0] in RunConfig._SECTIONS and len(parts) >= 2:
            section = _replace_field(getattr(cfg, parts[0]), parts[1:], value, key)
            cfg = replace(cfg, **{parts[0]: section})
        else:
            raise ConfigError(f"unknown key {key!r}; keys start with one of: method, "
                              f"{', '.join(RunConfig._SECTIONS)}, seed")
    return cfg


def parse_set_args(items: list[str]) -> dict[str, str]:
    """Parse ``["a.b=1", "c.d=x"]`` into a dict, rejecting items without '='."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


__all__ = [
    "BudgetConfig",
    "ConfigError",
    "DataConfig",
    "EvalValues",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "coerce",
    "parse_set_args",
]
