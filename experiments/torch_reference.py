"""PyTorch reference of IR-Net's networks (Qin et al., CVPR 2020), torch only.

Independent re-implementations of every network of the official code
(github.com/htqin/IR-Net), one per name of ``irnet_jax.models.REGISTRY`` in
:data:`MODELS`: CIFAR ResNet-20 1w1a (Bi-Real, option-A shortcuts) and 1w32a, CIFAR
ResNet-18, VGG-Small, ImageNet ResNet-18/34 1w1a (Bi-Real, FP downsample) and 1w32a.
Their ``state_dict`` keys are exactly the official ones (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ``layer2.0.shortcut.0.weight`` / ``downsample.1.*``, ``bn2.*``,
``linear.*`` / ``fc.*``, ImageNet's unused ``bn3.*``). Differences from the official
modules, none of which changes a value: EDE's ``t``, ``k`` are set with :func:`set_ede`
on any device and dtype (upstream hard-codes ``.cuda()`` float32 tensors), and ImageNet's
``AvgPool2d(7)`` is the global average (the same at 224x224; see
:class:`ImageNetResNet`). The golden files of the JAX test suite are made from these
models (``experiments/make_golden.py``); ``dump`` and ``bench`` below use ResNet-20.
It imports no JAX: data crosses over as ``.npz`` files.

  python experiments/torch_reference.py dump --out ref.npz [--seed 0] [--batch 16]
      [--plain] [--act-bits 32] [--t 0.3] [--k 3.3]
  python experiments/torch_reference.py bench --batch 128 --steps 20 [--threads 2]
      [--plain] [--act-bits 32]

``dump`` writes (all numpy, torch layouts, NCHW input):

  ``sd/<key>``        state_dict before any forward pass (randomized, see below)
  ``x``, ``y``        input batch (N, 3, 32, 32) and integer labels (N,)
  ``t``, ``k``        EDE parameters set on every IRConv2d for the train pass
  ``logits_eval``     eval-mode logits (running statistics of ``sd``)
  ``logits_train``    train-mode logits (batch statistics)
  ``loss``            mean cross-entropy of ``logits_train``
  ``grad/<key>``      d loss / d parameter, for every parameter (not buffers)
  ``sd_after/<key>``  state_dict after the train-mode forward (running stats moved)
  ``meta/*``          seed, batch, num_classes, plain, act_bits, dtype

``bench`` prints a JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- ops


class BinaryQuantize(torch.autograd.Function):
  """sign(x) forward; IR-Net's EDE gradient ``k * t * (1 - tanh(t x)^2) * g`` backward."""

  @staticmethod
  def forward(ctx: Any, x: torch.Tensor, k: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    ctx.save_for_backward(x, k, t)
    return torch.sign(x)

  @staticmethod
  def backward(ctx: Any, grad_out: torch.Tensor):
    x, k, t = ctx.saved_tensors
    th = torch.tanh(x * t)
    return k * t * (1 - th * th) * grad_out, None, None


class IRConv2d(nn.Conv2d):
  """Binary conv of IR-Net: Libra-PB weights, EDE-binarized inputs.

  Weights: per output channel, subtract the mean and divide by the unbiased std
  (``torch.std``), binarize with :class:`BinaryQuantize`, then multiply by the
  detached power-of-two scale ``2 ** round(log2(mean |bw|))`` of the standardized
  weights. Inputs (when ``binary_act``) are binarized with the same ``k``, ``t``.
  The conv's zero padding is applied after binarization (border taps see 0).

  ``k`` and ``t`` are plain tensor attributes (not buffers), as in the official
  code, so they do not appear in the ``state_dict``; set them with :func:`set_ede`.
  """

  def __init__(self, *args: Any, binary_act: bool = True, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.binary_act = binary_act
    self.k = torch.tensor([10.0], dtype=self.weight.dtype)
    self.t = torch.tensor([0.1], dtype=self.weight.dtype)

  def quantized_weight(self) -> torch.Tensor:
    """The Libra-PB binarized, power-of-two scaled weight (OIHW)."""
    w = self.weight
    flat = w.reshape(w.shape[0], -1)
    bw = w - flat.mean(-1).reshape(-1, 1, 1, 1)
    bw = bw / bw.reshape(bw.shape[0], -1).std(-1).reshape(-1, 1, 1, 1)
    mean_abs = bw.abs().reshape(bw.shape[0], -1).mean(-1)
    exponent = torch.round(torch.log(mean_abs) / math.log(2))
    sw = torch.pow(torch.full_like(exponent, 2.0), exponent).reshape(-1, 1, 1, 1).detach()
    return BinaryQuantize.apply(bw, self.k, self.t) * sw

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    a = BinaryQuantize.apply(x, self.k, self.t) if self.binary_act else x
    return F.conv2d(a, self.quantized_weight(), self.bias, self.stride, self.padding,
                    self.dilation, self.groups)


def set_ede(model: nn.Module, t: float, k: float) -> None:
  """Set the EDE parameters ``t`` and ``k`` (as 1-element tensors) on every IRConv2d."""
  for m in model.modules():
    if isinstance(m, IRConv2d):
      m.t = torch.tensor([float(t)], dtype=m.weight.dtype, device=m.weight.device)
      m.k = torch.tensor([float(k)], dtype=m.weight.dtype, device=m.weight.device)


def ede_schedule(epoch: int, epochs: int, t_min: float = 1e-3,
                 t_max: float = 10.0) -> tuple[float, float]:
  """The official per-epoch (t, k): t log-uniform from t_min to t_max, k = max(1/t, 1)."""
  lo, hi = math.log10(t_min), math.log10(t_max)
  t = 10.0 ** (lo + (hi - lo) / epochs * epoch)
  return t, (1.0 / t if t < 1 else 1.0)


# ------------------------------------------------------------------------ model


class OptionAShortcut(nn.Module):
  """Parameter-free CIFAR shortcut: spatial ``::2`` subsample, zero-pad planes//4 channels."""

  def __init__(self, planes: int):
    super().__init__()
    self.pad = planes // 4

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
  """Two IRConv2d 3x3 + BN, of every official IR-Net ResNet.

  Bi-Real (official ResNet-20 1w1a and ImageNet 1w1a; ``act`` = hardtanh)::

    out = act(bn1(conv1(x)) + shortcut(x))
    out = act(bn2(conv2(out)) + out)

  plain (official CIFAR ResNet-18 and every 1w32a network, one shortcut per block)::

    out = act(bn1(conv1(x)))
    out = act(bn2(conv2(out)) + shortcut(x))

  A shortcut that changes shape is option "A" (:class:`OptionAShortcut`, no state) or
  "B" (FP 1x1 conv + BN, stored as ``shortcut_name``: "shortcut" in the CIFAR code,
  "downsample" in the ImageNet code, so that the state_dict keys are the official ones).
  An identity shortcut is an empty ``nn.Sequential`` (no state), like the official code.
  """

  def __init__(self, in_planes: int, planes: int, stride: int = 1, *,
               plain: bool = False, binary_act: bool = True, relu: bool = False,
               option: str = "A", shortcut_name: str = "shortcut"):
    super().__init__()
    self.conv1 = IRConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False,
                          binary_act=binary_act)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = IRConv2d(planes, planes, 3, stride=1, padding=1, bias=False,
                          binary_act=binary_act)
    self.bn2 = nn.BatchNorm2d(planes)
    self.plain, self.shortcut_name = plain, shortcut_name
    self.act = F.relu if relu else F.hardtanh
    shortcut: nn.Module = nn.Sequential()
    if stride != 1 or in_planes != planes:
      if option == "A":
        shortcut = OptionAShortcut(planes)
      else:
        shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes))
    setattr(self, shortcut_name, shortcut)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    residual = getattr(self, self.shortcut_name)(x)
    if self.plain:
      out = self.act(self.bn1(self.conv1(x)))
      return self.act(self.bn2(self.conv2(out)) + residual)
    out = self.act(self.bn1(self.conv1(x)) + residual)
    return self.act(self.bn2(self.conv2(out)) + out)


def _stage(in_planes: int, planes: int, n: int, stride: int, **block_kw: Any) -> nn.Sequential:
  blocks = []
  for s in [stride] + [1] * (n - 1):
    blocks.append(BasicBlock(in_planes, planes, s, **block_kw))
    in_planes = planes
  return nn.Sequential(*blocks)


class ResNet(nn.Module):
  """CIFAR ResNet: FP conv1 3x3, bn1 [, act], stages, global avg pool, BN1d [, act], FP linear.

  ResNet-20 (official CIFAR-10/ResNet20): widths 16/32/64, option-A shortcuts; 1w1a
  has hardtanh after the stem; 1w32a has ReLU blocks, no stem activation and a ReLU
  after bn2. ResNet-18 (official CIFAR-10/ResNet18): widths 64..512, option B, no stem
  activation, and a LogSoftmax output (``log_softmax=True``). ``F.avg_pool2d(out, 4)``
  of the official ResNet-18 is the global average at 32x32 inputs.
  """

  def __init__(self, num_blocks: tuple[int, ...] = (3, 3, 3), num_classes: int = 10, *,
               widths: tuple[int, ...] = (16, 32, 64), option: str = "A",
               plain: bool = False, binary_act: bool = True, relu: bool = False,
               stem_act: bool = True, head_act: bool = False, log_softmax: bool = False):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    block_kw = dict(plain=plain, binary_act=binary_act, relu=relu, option=option)
    in_planes = widths[0]
    for i, (planes, n) in enumerate(zip(widths, num_blocks)):
      setattr(self, f"layer{i + 1}", _stage(in_planes, planes, n, 1 if i == 0 else 2,
                                            **block_kw))
      in_planes = planes
    self.num_stages = len(widths)
    self.bn2 = nn.BatchNorm1d(in_planes)
    self.linear = nn.Linear(in_planes, num_classes)
    self.act = F.relu if relu else F.hardtanh
    self.stem_act, self.head_act, self.log_softmax = stem_act, head_act, log_softmax
    for m in self.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        # Official ResNet-20 `_weights_init`: kaiming normal (fan_in, gain sqrt(2)) on
        # weights only; the linear bias keeps PyTorch's default uniform init.
        nn.init.kaiming_normal_(m.weight)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.bn1(self.conv1(x))
    if self.stem_act:
      out = self.act(out)
    for i in range(self.num_stages):
      out = getattr(self, f"layer{i + 1}")(out)
    out = self.bn2(F.avg_pool2d(out, out.shape[3]).flatten(1))
    if self.head_act:
      out = self.act(out)
    out = self.linear(out)
    return F.log_softmax(out, dim=1) if self.log_softmax else out


class ImageNetResNet(nn.Module):
  """Official ImageNet ResNet-18/34 (ImageNet/ResNet{18,34}/{1w1a,1w32a}/models/resnet.py).

  FP conv1 7x7/2, bn1, act, max pool 3x3/2; stages of :class:`BasicBlock` with
  ``downsample`` = FP 1x1 conv + BN; average pool, BN1d ``bn2``, FP ``fc``, LogSoftmax.
  1w1a: Bi-Real blocks, hardtanh; 1w32a: plain blocks, ReLU, weight-only binary.
  ``bn3`` exists in the official model (and its state_dict) but is never called.
  The official ``AvgPool2d(7)`` is written as the global average: the same at 224x224
  inputs, and defined for the small inputs of the golden files.
  """

  def __init__(self, num_blocks: tuple[int, ...], num_classes: int = 1000, *,
               plain: bool = False, binary_act: bool = True, relu: bool = False):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    block_kw = dict(plain=plain, binary_act=binary_act, relu=relu, option="B",
                    shortcut_name="downsample")
    in_planes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
      setattr(self, f"layer{i + 1}", _stage(in_planes, planes, n, 1 if i == 0 else 2,
                                            **block_kw))
      in_planes = planes
    self.bn2 = nn.BatchNorm1d(512)
    self.fc = nn.Linear(512, num_classes)
    self.bn3 = nn.BatchNorm1d(num_classes)  # Unused in forward, as upstream.
    self.act = F.relu if relu else F.hardtanh
    for m in self.modules():
      if isinstance(m, nn.Conv2d):  # IRConv2d too: normal_(0, sqrt(2 / (k*k*out))).
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.act(self.bn1(self.conv1(x))))
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
    x = self.bn2(F.adaptive_avg_pool2d(x, 1).flatten(1))
    return F.log_softmax(self.fc(x), dim=1)


class VGGSmall(nn.Module):
  """Official VGG-Small 1w1a (CIFAR-10/VGG-Small/vgg.py, VGG_SMALL_1W1A), 32x32 inputs.

  FP conv0 3->128 + bn0 + hardtanh; IRConv2d conv1..conv5 (128, 256, 256, 512, 512),
  each ``conv -> [max pool 2x2 after conv1, conv3, conv5] -> bn -> hardtanh``; flatten
  (C, H, W) and FP ``fc`` 8192 -> classes. No LogSoftmax.
  """

  def __init__(self, num_classes: int = 10):
    super().__init__()
    channels = (128, 128, 256, 256, 512, 512)
    self.conv0 = nn.Conv2d(3, 128, kernel_size=3, padding=1, bias=False)
    self.bn0 = nn.BatchNorm2d(128)
    for i in range(1, 6):
      setattr(self, f"conv{i}", IRConv2d(channels[i - 1], channels[i], 3, padding=1,
                                         bias=False))
      setattr(self, f"bn{i}", nn.BatchNorm2d(channels[i]))
    self.fc = nn.Linear(512 * 4 * 4, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.hardtanh(self.bn0(self.conv0(x)))
    for i in range(1, 6):
      x = getattr(self, f"conv{i}")(x)
      if i in (1, 3, 5):
        x = F.max_pool2d(x, 2, 2)
      x = F.hardtanh(getattr(self, f"bn{i}")(x))
    return self.fc(x.flatten(1))


def resnet20_1w1a(num_classes: int = 10, *, plain: bool = False,
                  act_bits: int = 1) -> ResNet:
  """ResNet-20 1w1a structure; ``act_bits=32`` keeps it and only stops binarizing inputs
  (the *official* 1w32a network differs, see :func:`resnet20_1w32a`)."""
  if act_bits not in (1, 32):
    raise ValueError(f"act_bits must be 1 or 32, got {act_bits}")
  return ResNet((3, 3, 3), num_classes, plain=plain, binary_act=act_bits == 1)


def resnet20_1w32a(num_classes: int = 10) -> ResNet:
  """Official CIFAR-10/ResNet20/1w32a: plain ReLU blocks, no stem act, ReLU after bn2."""
  return ResNet((3, 3, 3), num_classes, plain=True, binary_act=False, relu=True,
                stem_act=False, head_act=True)


def resnet18_cifar(num_classes: int = 10) -> ResNet:
  """Official CIFAR-10/ResNet18 (1w1a): plain hardtanh blocks, option-B shortcuts."""
  return ResNet((2, 2, 2, 2), num_classes, widths=(64, 128, 256, 512), option="B",
                plain=True, stem_act=False, log_softmax=True)


# Every network of irnet_jax.models.REGISTRY, by its name there: num_classes -> module.
MODELS: dict[str, Any] = {
    "resnet20": resnet20_1w1a,
    "resnet20_1w32a": resnet20_1w32a,
    "resnet18_cifar": resnet18_cifar,
    "vgg_small": VGGSmall,
    "resnet18": lambda num_classes=1000: ImageNetResNet((2, 2, 2, 2), num_classes),
    "resnet34": lambda num_classes=1000: ImageNetResNet((3, 4, 6, 3), num_classes),
    "resnet18_1w32a": lambda num_classes=1000: ImageNetResNet(
        (2, 2, 2, 2), num_classes, plain=True, binary_act=False, relu=True),
    "resnet34_1w32a": lambda num_classes=1000: ImageNetResNet(
        (3, 4, 6, 3), num_classes, plain=True, binary_act=False, relu=True),
}
# Networks whose official forward ends in LogSoftmax (irnet_jax returns the logits).
LOG_SOFTMAX_OUTPUT = ("resnet18_cifar", "resnet18", "resnet34", "resnet18_1w32a",
                      "resnet34_1w32a")


# ------------------------------------------------------------------------- dump


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
  """Make every BN's affine params and running stats non-trivial (deterministic in gen).

  weight ~ U(0.5, 1.5), bias ~ N(0, 0.2^2), running_mean ~ N(0, 0.2^2),
  running_var ~ U(0.5, 2.0); num_batches_tracked is left at 0.
  """
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.modules.batchnorm._BatchNorm):
        n, dt = m.num_features, m.weight.dtype
        m.weight.copy_(0.5 + torch.rand(n, generator=gen, dtype=dt))
        m.bias.copy_(0.2 * torch.randn(n, generator=gen, dtype=dt))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=gen, dtype=dt))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen, dtype=dt))


def _state_numpy(model: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def dump(out: str, seed: int, batch: int, t: float, k: float, plain: bool,
         act_bits: int, num_classes: int) -> dict[str, np.ndarray]:
  """Build a float64 model, run eval + train passes and save everything to ``out``."""
  torch.set_default_dtype(torch.float64)
  torch.manual_seed(seed)
  model = resnet20_1w1a(num_classes, plain=plain, act_bits=act_bits)
  gen = torch.Generator().manual_seed(seed + 1)
  randomize_bn(model, gen)
  x = torch.randn(batch, 3, 32, 32, generator=gen, dtype=torch.float64)
  y = torch.randint(0, num_classes, (batch,), generator=gen)
  set_ede(model, t, k)

  arrays: dict[str, np.ndarray] = {f"sd/{n}": v for n, v in _state_numpy(model).items()}

  model.eval()
  with torch.no_grad():
    logits_eval = model(x)

  model.train()
  model.zero_grad(set_to_none=True)
  logits_train = model(x)
  loss = F.cross_entropy(logits_train, y)
  loss.backward()

  arrays.update({
      "x": x.numpy(), "y": y.numpy(),
      "t": np.array(t, np.float64), "k": np.array(k, np.float64),
      "logits_eval": logits_eval.numpy(),
      "logits_train": logits_train.detach().numpy(),
      "loss": np.array(loss.item(), np.float64),
  })
  for n, p in model.named_parameters():
    if p.grad is None:
      raise RuntimeError(f"parameter {n} got no gradient")
    arrays[f"grad/{n}"] = p.grad.numpy().copy()
  arrays.update({f"sd_after/{n}": v for n, v in _state_numpy(model).items()})
  arrays.update({
      "meta/seed": np.array(seed), "meta/batch": np.array(batch),
      "meta/num_classes": np.array(num_classes), "meta/plain": np.array(plain),
      "meta/act_bits": np.array(act_bits), "meta/dtype": np.array("float64"),
      "meta/torch_version": np.array(torch.__version__),
  })
  np.savez(out, **arrays)
  return arrays


# ------------------------------------------------------------------------ bench


def bench(batch: int, steps: int, threads: int, plain: bool, act_bits: int,
          warmup: int = 3) -> dict[str, Any]:
  """Images/s of a full SGD training step and of an eval forward, float32 on CPU."""
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = resnet20_1w1a(10, plain=plain, act_bits=act_bits)
  t, k = ede_schedule(0, 400)
  set_ede(model, t, k)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))

  def train_step() -> float:
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()

  model.train()
  for _ in range(warmup):
    train_step()
  start = time.perf_counter()
  for _ in range(steps):
    train_step()
  train_s = time.perf_counter() - start

  model.eval()
  with torch.no_grad():
    for _ in range(warmup):
      model(x).sum().item()
    start = time.perf_counter()
    for _ in range(steps):
      model(x).sum().item()
    eval_s = time.perf_counter() - start

  return {
      "framework": "pytorch", "torch_version": torch.__version__,
      "train_images_per_sec": batch * steps / train_s,
      "eval_images_per_sec": batch * steps / eval_s,
      "batch": batch, "threads": torch.get_num_threads(), "steps": steps,
      "structure": "plain" if plain else "bireal", "act_bits": act_bits,
  }


# -------------------------------------------------------------------------- cli


def main(argv: list[str] | None = None) -> None:
  """Command line entry point (``dump`` / ``bench``)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="mode", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--plain", action="store_true",
                      help="one shortcut per block instead of Bi-Real")
  common.add_argument("--act-bits", type=int, default=1, choices=(1, 32),
                      help="1: 1w1a (default); 32: 1w32a, weights only binary")

  p_dump = sub.add_parser("dump", parents=[common], help="write golden data to an .npz")
  p_dump.add_argument("--out", required=True)
  p_dump.add_argument("--seed", type=int, default=0)
  p_dump.add_argument("--batch", type=int, default=16)
  p_dump.add_argument("--t", type=float, default=0.3)
  p_dump.add_argument("--k", type=float, default=3.3)
  p_dump.add_argument("--num-classes", type=int, default=10)

  p_bench = sub.add_parser("bench", parents=[common], help="CPU training throughput")
  p_bench.add_argument("--batch", type=int, default=128)
  p_bench.add_argument("--steps", type=int, default=20)
  p_bench.add_argument("--threads", type=int, default=2)

  args = parser.parse_args(argv)
  if args.mode == "dump":
    arrays = dump(args.out, args.seed, args.batch, args.t, args.k, args.plain,
                  args.act_bits, args.num_classes)
    n_sd = sum(k.startswith("sd/") for k in arrays)
    n_grad = sum(k.startswith("grad/") for k in arrays)
    print(f"wrote {args.out}: {n_sd} state_dict entries, {n_grad} gradients, "
          f"loss={float(arrays['loss']):.10f}")
  else:
    print(json.dumps(bench(args.batch, args.steps, args.threads, args.plain,
                           args.act_bits)))


if __name__ == "__main__":
  main()
