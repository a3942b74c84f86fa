"""Writes the golden files of the test suite: every network, float64, from the PyTorch reference.

  python experiments/make_golden.py --out tests/golden [--models resnet20,vgg_small]

Needs torch (CPU is enough; about a minute). For each name of
``irnet_jax.models.REGISTRY`` it builds the official network of
``experiments/torch_reference.py`` in float64 with 10 classes, loads the weights of
``tests/golden_inputs.py`` (He-scaled conv/linear weights, perturbed BN affine
parameters and running statistics, all a pure function of the seed and the key) and
runs, on images of the same origin (CIFAR nets 32x32; ImageNet nets 64x64, where the
official ``AvgPool2d(7)`` is the global average, see ``torch_reference.ImageNetResNet``):

  * eval mode: the network's output (logits, or log-probabilities where the official
    model ends in LogSoftmax: ``meta['output']``);
  * train mode at one EDE point (t, k): the output, the mean cross-entropy ``loss``,
    the BN running statistics after this forward, and d loss / d every parameter.

Each ``NAME.npz`` (``np.savez_compressed``) holds:

  ``meta``              JSON: model, num_classes, batch, image_size, seed, t, k, output,
                        state_dict spec [[key, torch shape], ...], inputs_sha256
                        (``golden_inputs.checksum``), torch version, full_max
  ``y``                 integer labels (batch,)
  ``eval_out``, ``train_out``, ``loss``
  ``stat/KEY``          every ``running_mean`` / ``running_var`` after the train forward
  ``grad/KEY``          full gradient of every parameter with at most ``full_max`` values,
                        and of the FP stem and classifier weights up to 10,000 values
  ``grad_slice/KEY``    ``grad[0]`` (output channel / class 0) of the first and last binary
                        conv and of a larger FP stem or classifier (VGG-Small's fc)
  ``grad_summary/KEY``  ``[sum, L2 norm, sum(grad * probe)]`` of every parameter's
                        gradient (``golden_inputs.summary``)

Prints one line per network: file size and max |value| of the outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

import golden_inputs  # noqa: E402  (tests/golden_inputs.py, numpy only)
import torch_reference as ref  # noqa: E402

from irnet_jax import models  # noqa: E402  (only for the list of names)

NUM_CLASSES = 10
IMAGENET = ("resnet18", "resnet34", "resnet18_1w32a", "resnet34_1w32a")
FULL_MAX = 2304     # Gradients with at most this many values are stored whole,
FP_FULL_MAX = 10_000  # and the full-precision stem's and classifier's up to this size.
FP_ENDS = ("conv0.weight", "conv1.weight", "linear.weight", "fc.weight")
T, K = 0.3, 3.3     # The EDE point of the train-mode pass.
MIN_MARGIN = 1e-9   # Refuse inputs where a sign or a rounding could flip between libraries.


def input_shape(name: str) -> tuple[int, int, int, int]:
  """(batch, 3, size, size): small, but every BN still sees > 2 values per channel."""
  if name == "vgg_small":
    return (2, 3, 32, 32)  # No BatchNorm1d; the heaviest network per image.
  return (4, 3, 64, 64) if name in IMAGENET else (4, 3, 32, 32)


def _check_margins(model: torch.nn.Module, x: torch.Tensor) -> None:
  """Every binarized value and every Libra-PB exponent far from its decision boundary."""
  worst = {"act": math.inf, "exp": math.inf}

  def hook(module, args):
    if module.binary_act:
      worst["act"] = min(worst["act"], float(args[0].abs().min()))
    w = module.weight.detach().flatten(1)
    bw = (w - w.mean(1, keepdim=True))
    bw = bw / bw.std(1, keepdim=True)
    e = torch.log2(bw.abs().mean(1))
    worst["exp"] = min(worst["exp"], float((e - e.floor() - 0.5).abs().min()))
    bad = float(bw.abs().min())
    worst["act"] = min(worst["act"], bad)  # Standardized weights are binarized too.

  handles = [m.register_forward_pre_hook(hook) for m in model.modules()
             if isinstance(m, ref.IRConv2d)]
  with torch.no_grad():
    model.train()
    model(x)
  for h in handles:
    h.remove()
  if worst["act"] < MIN_MARGIN or worst["exp"] < MIN_MARGIN:
    raise RuntimeError(f"inputs too close to a sign/rounding boundary ({worst}); use "
                       "another --seed")


def _binary_conv_keys(model: torch.nn.Module) -> list[str]:
  return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, ref.IRConv2d)]


def make(name: str, seed: int) -> dict[str, np.ndarray]:
  """Runs the reference network ``name`` and returns the arrays of its golden file."""
  torch.set_default_dtype(torch.float64)
  model = ref.MODELS[name](num_classes=NUM_CLASSES)
  spec = [(k, list(v.shape)) for k, v in model.state_dict().items()]
  weights = golden_inputs.state_dict(spec, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
  shape = input_shape(name)
  x_np = golden_inputs.images(shape, seed)
  x = torch.from_numpy(x_np)
  y_np = (golden_inputs.uniform("labels", seed, shape[:1], 0, NUM_CLASSES)
          .astype(np.int64))
  y = torch.from_numpy(y_np)
  _check_margins(model, x)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})  # Reset BN.

  model.eval()
  with torch.no_grad():
    eval_out = model(x)
  ref.set_ede(model, T, K)
  model.train()
  model.zero_grad(set_to_none=True)
  train_out = model(x)
  loss = F.cross_entropy(train_out, y)  # On log-probabilities too: log_softmax is idempotent.
  loss.backward()

  arrays = {"y": y_np, "eval_out": eval_out.numpy(), "train_out": train_out.detach().numpy(),
            "loss": np.array(loss.item())}
  for key, value in model.state_dict().items():
    if key.endswith(("running_mean", "running_var")):
      arrays[f"stat/{key}"] = value.numpy().copy()
  binary = _binary_conv_keys(model)
  for key, p in model.named_parameters():
    # ImageNet's unused bn3 gets no gradient: zero, as JAX's.
    g = np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy()
    arrays[f"grad_summary/{key}"] = golden_inputs.summary(key, g)
    fp_end = key in FP_ENDS and key not in binary
    if g.size <= FULL_MAX or (fp_end and g.size <= FP_FULL_MAX):
      arrays[f"grad/{key}"] = g.copy()
    elif fp_end or key in (binary[0], binary[-1]):
      arrays[f"grad_slice/{key}"] = g[0].copy()
  meta = dict(model=name, num_classes=NUM_CLASSES, batch=shape[0], image_size=shape[2],
              seed=seed, t=T, k=K,
              output="log_softmax" if name in ref.LOG_SOFTMAX_OUTPUT else "logits",
              state_dict=spec, inputs_sha256=golden_inputs.checksum(weights, x_np),
              torch_version=torch.__version__, full_max=FULL_MAX,
              command="python experiments/make_golden.py --out tests/golden")
  arrays["meta"] = np.array(json.dumps(meta))
  return arrays


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory, e.g. tests/golden")
  parser.add_argument("--models", default="", help="comma-separated; default: all")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  names = args.models.split(",") if args.models else sorted(models.REGISTRY)
  missing = sorted(set(names) - set(ref.MODELS))
  if missing:
    raise SystemExit(f"no PyTorch reference for {missing}: add the official network to "
                     "experiments/torch_reference.py MODELS first.")
  os.makedirs(args.out, exist_ok=True)
  for name in names:
    start = time.perf_counter()
    arrays = make(name, args.seed)
    path = os.path.join(args.out, f"{name}.npz")
    np.savez_compressed(path, **arrays)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} kB, loss {float(arrays['loss']):.6f}, "
          f"{len(arrays)} arrays, {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
  main()
