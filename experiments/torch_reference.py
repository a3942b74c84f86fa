"""PyTorch reference of IR-Net's CIFAR ResNet-20 (Qin et al., CVPR 2020), torch only.

An independent re-implementation of the official ``CIFAR-10/ResNet20/1w1a`` model
(Bi-Real structure, option-A shortcuts) whose ``state_dict`` keys are exactly the
official ones (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``,
``layer1.0.bn1.*``, ..., ``bn2.*``, ``linear.weight``, ``linear.bias``). It is used to
produce golden data for the JAX port and a PyTorch CPU throughput baseline. It
imports no JAX: data crosses over as ``.npz`` files.

Run it with the separate torch venv (``/work/torchvenv``)::

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


class BasicBlock1w1a(nn.Module):
  """Two IRConv2d 3x3 + BN + hardtanh.

  Bi-Real (default, official ResNet-20)::

    out = hardtanh(bn1(conv1(x)) + shortcut(x))
    out = hardtanh(bn2(conv2(out)) + out)

  plain (one shortcut per block)::

    out = hardtanh(bn1(conv1(x)))
    out = hardtanh(bn2(conv2(out)) + shortcut(x))
  """

  def __init__(self, in_planes: int, planes: int, stride: int = 1, *,
               plain: bool = False, binary_act: bool = True):
    super().__init__()
    self.conv1 = IRConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False,
                          binary_act=binary_act)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = IRConv2d(planes, planes, 3, stride=1, padding=1, bias=False,
                          binary_act=binary_act)
    self.bn2 = nn.BatchNorm2d(planes)
    self.plain = plain
    # An empty Sequential (identity) has no state, like the official code.
    self.shortcut: nn.Module = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = OptionAShortcut(planes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.plain:
      out = F.hardtanh(self.bn1(self.conv1(x)))
      return F.hardtanh(self.bn2(self.conv2(out)) + self.shortcut(x))
    out = F.hardtanh(self.bn1(self.conv1(x)) + self.shortcut(x))
    return F.hardtanh(self.bn2(self.conv2(out)) + out)


class ResNet(nn.Module):
  """CIFAR ResNet: FP conv1 3->16, bn1, hardtanh, 3 stages, avg pool, BN1d, FP linear."""

  def __init__(self, num_blocks: tuple[int, ...] = (3, 3, 3), num_classes: int = 10, *,
               plain: bool = False, binary_act: bool = True):
    super().__init__()
    self.in_planes = 16
    self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    block_kw = dict(plain=plain, binary_act=binary_act)
    self.layer1 = self._make_layer(16, num_blocks[0], 1, block_kw)
    self.layer2 = self._make_layer(32, num_blocks[1], 2, block_kw)
    self.layer3 = self._make_layer(64, num_blocks[2], 2, block_kw)
    self.bn2 = nn.BatchNorm1d(64)
    self.linear = nn.Linear(64, num_classes)
    for m in self.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        # Official `_weights_init`: kaiming normal (fan_in, gain sqrt(2)) on weights
        # only; the linear bias keeps PyTorch's default uniform init.
        nn.init.kaiming_normal_(m.weight)

  def _make_layer(self, planes: int, n: int, stride: int,
                  block_kw: dict[str, Any]) -> nn.Sequential:
    blocks = []
    for s in [stride] + [1] * (n - 1):
      blocks.append(BasicBlock1w1a(self.in_planes, planes, s, **block_kw))
      self.in_planes = planes
    return nn.Sequential(*blocks)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.hardtanh(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    out = F.avg_pool2d(out, out.shape[3]).flatten(1)
    return self.linear(self.bn2(out))


def resnet20_1w1a(num_classes: int = 10, *, plain: bool = False,
                  act_bits: int = 1) -> ResNet:
  """ResNet-20 1w1a (``act_bits=1``) or 1w32a (``act_bits=32``: only weights binary)."""
  if act_bits not in (1, 32):
    raise ValueError(f"act_bits must be 1 or 32, got {act_bits}")
  return ResNet((3, 3, 3), num_classes, plain=plain, binary_act=act_bits == 1)


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
