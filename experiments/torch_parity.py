"""Float64 parity of irnet_jax against the PyTorch reference of IR-Net's ResNet-20.

  /work/torchvenv/bin/python experiments/torch_reference.py dump --out /tmp/ref.npz
  python experiments/torch_parity.py --ref=/tmp/ref.npz [--plain]

Loads the torch ``state_dict`` from the dump with ``convert.load_torch_state_dict``
(official key names, OIHW kernels) into ``models.create("resnet20")`` in float64 and
compares eval logits, train-mode logits and loss at the dump's EDE (t, k), every
parameter gradient (mapped back with ``convert.to_torch_state_dict``) and the BN
running statistics after the train-mode forward. Prints max abs differences and, as
its last line, a JSON summary; exits non-zero if any difference exceeds ``--tol``.
"""
from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from irnet_jax import binarize, convert, models, ops  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("ref", None, "npz written by torch_reference.py dump.")
flags.DEFINE_float("tol", 1e-10, "Max allowed abs difference.")
flags.mark_flags_as_required(["ref"])


def _prefixed(ref, prefix):
  return {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix)}


def main(argv) -> None:
  del argv
  ref = np.load(FLAGS.ref)
  plain = bool(ref["meta/plain"]) if "meta/plain" in ref.files else False
  act_bits = int(ref["meta/act_bits"]) if "meta/act_bits" in ref.files else 1
  num_classes = int(ref["meta/num_classes"]) if "meta/num_classes" in ref.files else 10
  model = models.create("resnet20", num_classes=num_classes, act_bits=act_bits,
                        structure="plain" if plain else "bireal", param_dtype=jnp.float64)
  convert.load_torch_state_dict(model, _prefixed(ref, "sd/"))
  x = jnp.asarray(ref["x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  y = jnp.asarray(ref["y"])
  ede = ops.EDE(jnp.float64(ref["t"]), jnp.float64(ref["k"]))
  diffs = {}
  model.eval()
  diffs["logits_eval"] = float(jnp.max(jnp.abs(model(x) - ref["logits_eval"])))
  model.train()

  def loss_fn(m):
    binarize.set_ede(m, ede)
    logits = m(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  diffs["logits_train"] = float(jnp.max(jnp.abs(logits - ref["logits_train"])))
  diffs["loss"] = abs(float(loss) - float(ref["loss"]))
  grads_t = convert.to_torch_state_dict(grads)
  ref_grads = _prefixed(ref, "grad/")
  assert grads_t.keys() == ref_grads.keys(), set(grads_t) ^ set(ref_grads)
  diffs["grads"] = max(float(np.max(np.abs(grads_t[k] - ref_grads[k]))) for k in ref_grads)
  after = convert.to_torch_state_dict(nnx.state(model))
  ref_after = _prefixed(ref, "sd_after/")
  diffs["running_stats"] = max(float(np.max(np.abs(after[k] - ref_after[k])))
                               for k in ref_after if "running" in k)
  for name, d in diffs.items():
    print(f"{name:14s} max |jax - torch| = {d:.3e}")
  ok = all(d <= FLAGS.tol for d in diffs.values())
  print(json.dumps(dict(ok=ok, tol=FLAGS.tol, plain=plain, act_bits=act_bits, **diffs)))
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
