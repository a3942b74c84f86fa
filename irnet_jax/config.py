"""Shared config defaults and validation for every experiment in ``irnet_jax/configs/``.

Every ``irnet_jax/configs/NAME.py`` starts from :func:`base_config` and overrides what its
recipe needs. :func:`validate` checks a config against the data and the devices
before anything is compiled, with one message naming the problem and the fix.
"""
from __future__ import annotations

import difflib
import inspect
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from irnet_jax import binarize, kernels, methods, models, ops
from irnet_jax import workdir as workdir_lib

OPTIMIZERS = ("sgd", "nesterov", "adam")
SCHEDULES = ("cosine_epoch", "cosine", "warmup_multistep", "constant")
EDE_SCHEDULE_BY = ("epoch", "step")
COMPUTE_DTYPES = ("float32", "bfloat16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
  """A config field that cannot work, with the fix; the CLIs print it as one line."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the official CIFAR-10 ResNet-20 1w1a recipe; configs override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # Initialization, data order and augmentation draws.
  c.num_epochs = 400              # Length of the run in epochs (unless num_train_steps > 0).
  c.num_train_steps = -1          # -1: from num_epochs; > 0 overrides.
  c.batch_size = 128              # Global, across all devices and processes.
  c.eval_batch_size = 500         # Global; the last batch is padded and masked.
  c.log_every_steps = 50          # Steps between train records in metrics.jsonl.
  c.eval_every_steps = -1         # -1: at the end of every epoch (and at the end).
  c.checkpoint_every_steps = 1000 # Steps between checkpoints (and one at the end).
  c.keep_checkpoints = 3          # Newest checkpoints kept; older ones are deleted.
  c.analysis_every_steps = 0      # 0: off. Logs irnet_jax.diagnostics.measure().
  c.compute_dtype = "float32"     # Or "bfloat16" on GPU/TPU (params stay float32).
  c.progress_bar = True           # A tqdm bar on stderr (process 0).
  c.num_devices = -1              # -1: every device of every process; N: the first N (1 host).
  c.init_from = ""                # A workdir whose newest model state starts this run
                                  # (fine-tuning; e.g. one made by irnet_jax.convert).
  c.steps_per_call = 1            # K optimizer steps per device call (one lax.scan); the
                                  # log/eval/checkpoint cadences must be multiples of K.
  c.steps_per_call_mode = "auto"  # "scan" (one lax.scan: GPU/TPU), "dispatch" (K jitted
                                  # steps from the host: CPU), "auto": by platform.
  c.grad_accum_steps = 1          # Micro-batches per optimizer step (batch_size is the
                                  # global batch of one update; BN per micro-batch).
  c.tensorboard = True            # Also write every logged scalar as TensorBoard events.
  c.profile_steps = ""            # "START,STOP": a jax.profiler trace of those steps,
                                  # in WORKDIR/tensorboard (profile plugin layout).

  c.dataset = ml_collections.ConfigDict()
  # Sources (irnet_jax/data/sources.py): cifar10 | cifar100 (python archives, downloaded
  # once), imagefolder, filelist, npz, digits, tfds:NAME (e.g. tfds:imagenet2012).
  c.dataset.name = "cifar10"
  c.dataset.data_dir = ""         # cifar archives ("" = $IRNET_JAX_DATA_DIR or
                                  # ~/.cache/irnet_jax/data); tfds data dir for tfds:NAME.
  c.dataset.path = ""             # npz file; imagefolder root; filelist default image root.
  c.dataset.train_split = "train"  # imagefolder: folder under path; tfds: split name.
  c.dataset.test_split = ""       # "": "val" (imagefolder), "validation" (tfds
                                  # imagenet2012), else "test".
  c.dataset.train_list = ""       # filelist: "relative/path label" lines (train_source).
  c.dataset.test_list = ""        # filelist: the same for evaluation (val_source).
  c.dataset.train_root = ""       # filelist: root of train_list's paths ("" = path);
                                  # imagefolder: the train split's folder itself.
  c.dataset.test_root = ""        # filelist: root of test_list's paths ("" = path);
                                  # imagefolder: the test split's folder itself.
  c.dataset.augment = "cifar"     # cifar (pad-4 crop + flip) | shift | imagenet | none.
  c.dataset.image_size = 32       # Model input side in pixels.
  c.dataset.mean = IMAGENET_MEAN  # The official CIFAR code normalizes with these too.
  c.dataset.std = IMAGENET_STD    # Per-channel std of the normalization (0-1 pixels).
  c.dataset.num_threads = 2         # In-process reader threads (num_workers=0).
  c.dataset.num_workers = -1        # Worker processes; -1: usable CPUs for augment=imagenet
                                    # on images over 64 px, else 0 (threads).
  c.dataset.prefetch_mb = 1024      # Host prefetch budget (uint8 batches; >= 1 per worker).
  c.dataset.color_jitter_on = "device"  # imagenet recipe: "device" (in the step) or "host".
  c.dataset.jpeg_draft = True       # Reduced-DCT JPEG decode where the crop stays >= 224
                                    # (experiments/README.md, "Input pipeline").
  c.dataset.skip_bad_files = False  # True: replace undecodable image files (counted in logs).
  c.dataset.cache_on_device = False  # In-memory sets (cifar, npz, digits): hold the uint8
                                     # data on the device(s); shuffle/crop/flip in the step.

  c.model = ml_collections.ConfigDict()
  # A registry name (irnet_jax.models.REGISTRY) or a user's "package.module:factory",
  # called as factory(rngs=..., num_classes=..., **model.kwargs).
  c.model.name = "resnet20"
  c.model.kwargs = ml_collections.ConfigDict()  # Free-form: the factory's own arguments.
  # A method of irnet_jax.methods ("irnet", "bnn", "xnor", "bireal", "reactnet"): build
  # the network full-precision (a registry network's float twin, or the factory's), then
  # irnet_jax.binarize_model. "": the registry network as weight_bits/act_bits/... say.
  c.model.binarize = ""
  c.model.keep = ""  # With binarize: comma-separated layer paths to keep real-valued.
  c.model.num_classes = -1        # -1: from the dataset.
  c.model.structure = ""          # "": the model's default ("bireal" for resnet20).
  c.model.weight_bits = 1         # 1: binary weights; 32: full precision (registry networks).
  c.model.act_bits = 1            # 1: binary activations; 32: full precision (registry networks).
  c.model.estimator = "ede"       # Backward of the activation sign: ede | ste | ...
  c.model.weight_quantizer = "libra_pb"# libra_pb | sign | mean_abs | none.
  # How convolutions run (irnet_jax.kernels): "auto" picks for the run's devices
  # (the CPU kernels on one AVX-512 CPU, XLA otherwise); config.json records the
  # resolved name. Or "xla", "xla_cpu", "avx512".
  c.model.conv_impl = "auto"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"        # sgd | nesterov | adam.
  # "bop": Bop (irnet_jax.optim.bop) on the binary kernels, which start at +-1; `name`
  # then optimizes every other parameter. "": `name` optimizes all.
  c.optimizer.binary = ""
  c.optimizer.bop_threshold = 1e-8# Bop: flip a weight's sign when |m| exceeds this.
  c.optimizer.bop_gamma = 1e-4    # Bop: the adaptivity rate of its gradient average m.
  # "adam": a binarization method's own parameters (ReActNet's thresholds and RPReLU)
  # get Adam at method_params_lr (times the schedule's shape, no weight decay), as
  # ReActNet trains them; SGD at the recipe's 0.1 throws its thresholds out of the
  # inputs' range, where no gradient brings them back. "same": the optimizer above.
  c.optimizer.method_params = "adam"
  c.optimizer.method_params_lr = 5e-4# Adam's learning rate of the method's parameters.
  c.optimizer.learning_rate = 0.1 # Peak learning rate.
  c.optimizer.momentum = 0.9      # SGD momentum (or Adam's b1).
  c.optimizer.weight_decay = 1e-4  # L2 added to the gradient of every parameter (torch SGD).
  c.optimizer.schedule = "cosine_epoch"# cosine_epoch | cosine | warmup_multistep | constant.
  c.optimizer.warmup_steps = 0    # Linear warm-up steps from warmup_init_lr.
  c.optimizer.warmup_init_lr = 0.0# Learning rate at step 0 of the warm-up.
  c.optimizer.decay_fractions = (0.3, 0.6, 0.9)# warmup_multistep: decay points (fractions).
  c.optimizer.decay_factor = 0.1  # warmup_multistep: factor at each decay point.

  c.ede = ml_collections.ConfigDict()
  c.ede.t_min = 1e-3              # Official ResNet-20 1w1a trainer; the paper says 0.1.
  c.ede.t_max = 10.0              # EDE's t at the end of training (t grows from t_min).
  c.ede.schedule_by = "epoch"     # "epoch" (official CIFAR code) or "step".
  c.ede.every_steps = 1           # With schedule_by="step": refresh t, k every N steps.
  return c


def imagenet_config(model: str, act_bits: int = 1) -> ml_collections.ConfigDict:
  """The official ImageNet recipe (ImageNet/ResNet18/1w1a/config.yaml), batch 2048.

  SGD Nesterov momentum 0.9; linear warm-up 0.2 -> 0.8 over 2,500 iterations, then
  x0.1 at 30/60/90% of 62,500 iterations (~100 epochs); EDE by progress every 10
  iterations; random-resized-crop 224 + flip + colour jitter; eval resize 256, crop 224.

  Data: an ImageFolder tree by default (``--config.dataset.path=/data/imagenet`` with
  ``train/`` and ``val/`` inside); or ``dataset.name="filelist"`` with list files, or
  ``dataset.name="tfds:imagenet2012"`` (see the README, "ImageNet").
  """
  c = base_config()
  c.dataset.name = "imagefolder"
  c.dataset.augment = "imagenet"
  c.dataset.image_size = 224
  c.dataset.num_threads = 16
  c.model.name = model
  c.model.act_bits = act_bits
  c.batch_size = 2048
  c.eval_batch_size = 2000
  c.num_epochs = 100
  c.num_train_steps = 62500
  c.eval_every_steps = 2500
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  c.optimizer.name = "nesterov"
  c.optimizer.schedule = "warmup_multistep"
  c.optimizer.warmup_init_lr = 0.2
  c.optimizer.learning_rate = 0.8
  c.optimizer.warmup_steps = 2500
  c.optimizer.weight_decay = 1e-4
  c.ede.schedule_by = "step"
  c.ede.every_steps = 10
  c.ede.t_min = 0.1
  return c


def _choice(value, allowed, field):
  if value not in allowed:
    raise ConfigError(f"config.{field}={value!r} is not valid; choose one of {list(allowed)}.")


# Fields whose values may take another type than their default's: profile_steps as
# (START, STOP) from a config file; num_epochs fractional (steps = ceil(epochs x steps
# per epoch)).
_OTHER_TYPES = {"profile_steps": (str, list, tuple), "num_epochs": (int, float)}

# Numeric ranges beyond those checked with their own message in validate():
# field -> (lowest allowed, highest allowed or None, what it means).
_RANGES = {
    "seed": (0, 2**32 - 1, "a 32-bit random seed"),
    "keep_checkpoints": (1, None, "how many checkpoints to keep; 0 would keep none"),
    "analysis_every_steps": (0, None, "0 turns the analysis off"),
    "optimizer.momentum": (0, None, "0 turns momentum off"),
    "optimizer.weight_decay": (0, None, "0 turns weight decay off"),
    "optimizer.method_params_lr": (0, None, "Adam's learning rate for a method's own "
                                   "parameters"),
    "optimizer.warmup_steps": (0, None, "0: no warm-up"),
    "optimizer.warmup_init_lr": (0, None, "the learning rate at step 0 of the warm-up"),
    "dataset.image_size": (1, None, "pixels"),
    "dataset.num_threads": (0, None, "reader threads"),
    "dataset.num_workers": (-1, None, "-1: by recipe, 0: threads"),
    "dataset.prefetch_mb": (1, None, "MiB of prefetched batches"),
}


def field_names() -> list[str]:
  """Every field of :func:`base_config`, dotted (``optimizer.learning_rate``)."""
  return list(workdir_lib.flatten(base_config()))


def field_help() -> dict[str, str]:
  """``{field: meaning}`` from the comments of :func:`base_config` (the one place each
  field is explained): the comment on a field's line and its continuation lines, else
  the comment lines just above it."""
  lines = inspect.getsource(base_config).splitlines()
  out: dict[str, str] = {}
  above: list[str] = []
  for i, line in enumerate(lines):
    stripped = line.strip()
    match = re.match(r"c\.([\w.]+)\s*=", stripped)
    if match is None:
      above = above + [stripped[1:].strip()] if stripped.startswith("#") else []
      continue
    notes = [line.split("#", 1)[1].strip()] if "#" in line else []
    column = line.index("#") if notes else None
    for more in lines[i + 1:]:  # Continuation comments, aligned under this one.
      if column is None or not more.strip().startswith("#") or more.index("#") != column:
        break
      notes.append(more.strip()[1:].strip())
    out[match.group(1)] = " ".join(notes or above)
    above = []
  return out


def describe(c: ml_collections.ConfigDict) -> str:
  """Every field of ``c`` as ``--config.FIELD=VALUE  meaning`` lines, by section."""
  meanings, lines, section = field_help(), [], None
  fields = sorted(workdir_lib.flatten(c).items(), key=lambda kv: ("." in kv[0], kv[0]))
  for field, value in fields:
    head = field.rpartition(".")[0]
    if head != section:
      lines.append(f"\n[{head or 'run'}]")
      section = head
    text = f"--config.{field}={_flag_text(value)}"
    meaning = meanings.get(field, "")
    lines.append(f"  {text:<48} {meaning}".rstrip())
  return "\n".join(lines).lstrip("\n")


def _flag_text(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value))
  return '""' if value == "" else str(value)


def nearest_field(field: str, known: Sequence[str]) -> str | None:
  """The field of ``known`` that ``field`` most likely misspells (difflib), or None.

  A close name in the same section first (``optimizer.lerning_rate``), else a very
  close name in any section (``learning_rate`` or ``optimiser.learning_rate`` ->
  ``optimizer.learning_rate``).
  """
  parent, _, leaf = field.rpartition(".")
  siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
  anywhere = {k.rpartition(".")[2]: k for k in known}
  for names, cutoff in ((siblings, 0.6), (anywhere, 0.8)):
    close = difflib.get_close_matches(leaf, list(names), n=1, cutoff=cutoff)
    if close:
      return names[close[0]]
  return None


def _unknown_field_message(field: str, known: Sequence[str]) -> str:
  """The error for a field that base_config() does not have, with the closest one."""
  parent = field.rpartition(".")[0]
  close = nearest_field(field, known)
  siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
  hint = (f"did you mean config.{close}? Rename it" if close else
          f"the fields of config{'.' + parent if parent else ''} are {', '.join(siblings)}")
  return (f"config.{field} is not a config field (a typo in the config file?); {hint} "
          "(every field and its default: irnet_jax.config.base_config()).")


def _type_ok(value: Any, default: Any, field: str) -> bool:
  if field in _OTHER_TYPES:
    return isinstance(value, _OTHER_TYPES[field]) and not isinstance(value, bool)
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
  return True


def _type_name(default: Any) -> str:
  if isinstance(default, (tuple, list)):
    return "a tuple of numbers"
  return {bool: "True or False", int: "an integer", float: "a number",
          str: "a string"}.get(type(default), type(default).__name__)


def check_fields(c: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` unless every field of ``c`` is one of
  :func:`base_config`'s, of its type, and finite (the first part of :func:`validate`)."""
  schema = workdir_lib.flatten(base_config())
  sections = {k.rpartition(".")[0] for k in schema} - {""}
  for key in c.keys():  # A section replaced by a value (c.optimizer = 0.1).
    if key in sections and not isinstance(c[key], (ml_collections.ConfigDict, dict)):
      raise ConfigError(f"config.{key}={c[key]!r} replaces the whole section config.{key}; "
                        f"set one of its fields instead (e.g. config.{key}."
                        f"{next(k for k in schema if k.startswith(key + '.')).split('.')[1]}).")
  for field, value in workdir_lib.flatten(c).items():
    if field.startswith("model.kwargs."):  # The user's factory checks its own arguments.
      continue
    if field not in schema:
      raise ConfigError(_unknown_field_message(field, list(schema)))
    default = schema[field]
    if not _type_ok(value, default, field):
      raise ConfigError(f"config.{field}={value!r} ({type(value).__name__}) must be "
                        f"{_type_name(default)} like its default ({default!r}); e.g. "
                        f"--config.{field}={default!r}.")
    numbers = value if isinstance(value, (tuple, list)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
      raise ConfigError(f"config.{field}={value!r} is not finite; set a finite value (its "
                        f"default is {default!r}).")


def _check_ranges(c: ml_collections.ConfigDict) -> None:
  fields = workdir_lib.flatten(c)
  for field, (low, high, meaning) in _RANGES.items():
    if field not in fields:
      continue
    value = fields[field]
    if value < low or (high is not None and value > high):
      allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
      raise ConfigError(f"config.{field}={value!r} must be {allowed} ({meaning}); e.g. "
                        f"--config.{field}={workdir_lib.flatten(base_config())[field]!r}.")
  if fields.get("optimizer.momentum", 0) >= 1:
    raise ConfigError(f"config.optimizer.momentum={fields['optimizer.momentum']!r} must be "
                      "< 1 (1 never forgets a gradient); e.g. 0.9.")
  for field in ("dataset.std",):
    if field in fields and any(v <= 0 for v in fields[field]):
      raise ConfigError(f"config.{field}={fields[field]!r}: every value must be > 0 (inputs "
                        "are divided by it); e.g. the ImageNet std (0.229, 0.224, 0.225).")
  fractions = fields.get("optimizer.decay_fractions", ())
  if any(not 0 <= f <= 1 for f in fractions):
    raise ConfigError(f"config.optimizer.decay_fractions={fractions!r} must be fractions of "
                      "the run in [0, 1], e.g. (0.3, 0.6, 0.9).")
  if fields.get("optimizer.decay_factor", 1) <= 0:
    raise ConfigError(f"config.optimizer.decay_factor={fields['optimizer.decay_factor']!r} "
                      "must be > 0 (each decay multiplies the learning rate by it); e.g. 0.1.")


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises :class:`ConfigError` naming the bad field and the fix; cheap (no data, no
  compile), so it runs before anything is written.

  Checks, in order: fields :func:`base_config` does not have (a typo in a config file;
  typos in ``--config.*`` flags are answered by :mod:`irnet_jax.cli`), value
  types, finiteness, the choices and ranges of every field, and the relations between
  fields. ``num_devices``: the devices the run will use (``batch_size`` must divide
  evenly).
  """
  check_fields(c)
  _check_ranges(c)
  _check_model_name(c.model.name)
  _choice(c.model.binarize, ("", *methods.METHODS), "model.binarize")
  if models.is_factory(c.model.name) and not c.model.binarize:
    raise ConfigError(f"config.model.name={c.model.name!r} is your own network: say how to "
                      "binarize it with --config.model.binarize=irnet (or bnn, xnor, "
                      "bireal, reactnet).")
  _choice(c.model.estimator, ops.ESTIMATORS, "model.estimator")
  _choice(c.model.weight_quantizer, ops.WEIGHT_QUANTIZERS, "model.weight_quantizer")
  _choice(c.model.weight_bits, (1, 32), "model.weight_bits")
  _choice(c.model.act_bits, (1, 32), "model.act_bits")
  _choice(c.model.get("conv_impl", "auto"), kernels.CONV_IMPLS, "model.conv_impl")
  _choice(c.optimizer.name, OPTIMIZERS, "optimizer.name")
  _choice(c.optimizer.binary, ("", "bop"), "optimizer.binary")
  _choice(c.optimizer.get("method_params", "adam"), ("adam", "same"), "optimizer.method_params")
  _choice(c.optimizer.schedule, SCHEDULES, "optimizer.schedule")
  _choice(c.ede.schedule_by, EDE_SCHEDULE_BY, "ede.schedule_by")
  _choice(c.compute_dtype, COMPUTE_DTYPES, "compute_dtype")
  if not c.optimizer.learning_rate > 0:
    raise ConfigError(f"config.optimizer.learning_rate={c.optimizer.learning_rate} must be "
                     "> 0; set e.g. --config.optimizer.learning_rate=0.1.")
  if not c.num_epochs > 0:
    raise ConfigError(f"config.num_epochs={c.num_epochs} must be > 0 (to train a fixed "
                     "number of steps instead, also set config.num_train_steps > 0).")
  if not 0 < c.ede.t_min < c.ede.t_max:
    raise ConfigError(f"config.ede needs 0 < t_min < t_max, got t_min={c.ede.t_min}, "
                     f"t_max={c.ede.t_max}; the paper uses 0.1 -> 10.")
  if c.ede.every_steps < 1:
    raise ConfigError("config.ede.every_steps must be >= 1.")
  for field in ("batch_size", "eval_batch_size"):
    size = c[field]
    if size <= 0 or size % num_devices:
      raise ConfigError(f"config.{field}={size} must be a positive multiple of the "
                       f"{num_devices} devices; set --config.{field}="
                       f"{max(num_devices, size - size % num_devices)}.")
  for field in ("log_every_steps", "checkpoint_every_steps"):
    if c[field] <= 0:
      raise ConfigError(f"config.{field}={c[field]} must be > 0.")
  # -1 or a count, nothing else: num_train_steps=0 used to train the whole recipe and
  # eval_every_steps=0 to evaluate every epoch, silently, as -1 does.
  for field, minus_one in (("num_train_steps", "steps from num_epochs"),
                           ("eval_every_steps", "evaluate at the end of every epoch")):
    if c[field] != -1 and c[field] < 1:
      raise ConfigError(f"config.{field}={c[field]} is not valid: set -1 ({minus_one}) "
                        f"or a positive number of steps, e.g. --config.{field}=-1.")
  _choice(c.get("steps_per_call_mode", "auto"), ("auto", "scan", "dispatch"),
          "steps_per_call_mode")
  _check_steps_per_call(c)
  accumulate = c.get("grad_accum_steps", 1)
  if accumulate < 1 or c.batch_size % (accumulate * num_devices):
    raise ConfigError(f"config.grad_accum_steps={accumulate} must be >= 1 and divide "
                     f"batch_size={c.batch_size} into micro-batches that split over the "
                     f"{num_devices} device(s): batch_size must be a multiple of "
                     f"grad_accum_steps x devices = {max(accumulate, 1) * num_devices}.")
  profile_range(c)
  if c.dataset.name == "npz" and not c.dataset.path:
    raise ConfigError("config.dataset.name='npz' needs config.dataset.path; pass "
                     "--config.dataset.path=/path/to/arrays.npz (x_train, y_train, x_test, "
                     "y_test).")


def nearest_multiples(value: int, k: int) -> str:
  """``"8 or 16"``: the multiples of ``k`` around ``value`` (for error messages)."""
  low = max(k, value // k * k)
  return f"{low}" if low == value else f"{low} or {low + k}"


def check_multiple_of_call(field: str, value: int, k: int) -> None:
  """Raises when a cadence of ``value`` steps does not fall on a call boundary."""
  if value > 0 and value % k:
    raise ConfigError(f"config.{field}={value} is not a multiple of config.steps_per_call="
                     f"{k} (logging, evaluation and checkpoints happen between device "
                     f"calls); set --config.{field}={nearest_multiples(value, k)}, or "
                     "another steps_per_call.")


def _check_steps_per_call(c: ml_collections.ConfigDict) -> None:
  k = c.get("steps_per_call", 1)
  if not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.steps_per_call={k!r} must be an integer >= 1.")
  for field in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps",
                "analysis_every_steps"):
    check_multiple_of_call(field, c[field], k)


def profile_range(c: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """``(start, stop)`` steps of ``config.profile_steps="START,STOP"``, or None if unset."""
  spec = c.get("profile_steps", "")
  if spec in ("", None):
    return None
  try:
    start, stop = (int(v) for v in str(spec).strip("()[] ").split(","))
  except ValueError:
    start = stop = -1
  if not 0 <= start < stop:
    raise ConfigError(f"config.profile_steps={spec!r} must be 'START,STOP' with "
                     "0 <= START < STOP, e.g. --config.profile_steps=20,25.")
  return start, stop


def _check_model_name(name: str) -> None:
  if not models.is_factory(name):
    _choice(name, sorted(models.REGISTRY), "model.name")
    return
  try:
    models.factory(name)  # Imports the user's module now, before any data or compile.
  except ValueError as e:
    raise ConfigError(f"config.model.name: {e}") from e


def model_kwargs(c: ml_collections.ConfigDict) -> dict:
  """``models.create`` keyword arguments of ``c.model`` (num_classes must be resolved).

  A user's factory gets ``num_classes`` and ``model.kwargs``; a registry network gets
  the model fields, forced to full precision when ``model.binarize`` binarizes it."""
  m = c.model
  if m.num_classes <= 0:
    raise ConfigError("config.model.num_classes is not resolved; set it or let the training "
                     "loop take it from the dataset.")
  if models.is_factory(m.name):
    return dict(num_classes=m.num_classes, **m.get("kwargs", {}))
  if m.get("binarize"):
    return dict(num_classes=m.num_classes, structure=m.structure or None, weight_bits=32,
                act_bits=32, dtype=_compute_dtype(c), conv_impl=m.get("conv_impl", "auto"))
  return dict(num_classes=m.num_classes, structure=m.structure or None,
              weight_bits=m.weight_bits, act_bits=m.act_bits, estimator=m.estimator,
              weight_quantizer=m.weight_quantizer, dtype=_compute_dtype(c),
              conv_impl=m.get("conv_impl", "auto"))


def _compute_dtype(c: ml_collections.ConfigDict):
  return {"float32": None, "bfloat16": jnp.bfloat16}[c.get("compute_dtype", "float32")]


def build_model(c: ml_collections.ConfigDict, seed: int | None = None,
                devices: Sequence[jax.Device] | None = None,
                conv_impl: str | None = None) -> nnx.Module:
  """The network of config ``c``, initialized from ``seed`` (default ``c.seed``), with
  ``conv_impl`` (default ``c.model.conv_impl``) resolved for ``devices`` (None: JAX's
  default device)."""
  kw = model_kwargs(c)
  impl = kernels.resolve(conv_impl or c.model.get("conv_impl", "auto"), devices)
  if not models.is_factory(c.model.name):
    kw["conv_impl"] = impl
  model = models.create(c.model.name, rngs=nnx.Rngs(c.seed if seed is None else seed),
                        devices=devices, **kw)
  if c.model.get("binarize"):
    keep = [k.strip() for k in c.model.get("keep", "").split(",") if k.strip()]
    binarize.binarize_model(model, c.model.binarize, keep=keep or None, conv_impl=impl)
  return model


def num_train_steps(c: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int]:
  """(total steps, steps per epoch); an epoch is ``floor(N / batch)`` steps (drop last)."""
  steps_per_epoch = max(1, num_train_examples // c.batch_size)
  if c.num_train_steps > 0:
    return c.num_train_steps, steps_per_epoch
  return int(math.ceil(c.num_epochs * steps_per_epoch)), steps_per_epoch
