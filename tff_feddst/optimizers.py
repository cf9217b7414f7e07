"""Client optimizer: SGD with momentum and coupled L2 weight decay.

The paper trains clients with PyTorch's `SGD(lr, momentum, weight_decay)`:
    g <- g + wd * w;   v <- momentum * v + g;   w <- w - lr * v
(first step v = g). TFF's `build_sgdm` is the same rule without weight
decay, so this optimizer adds `wd * w` to the gradient and delegates to it.
Using one optimizer for FedAvg, FedProx and FedDST keeps their client work
comparable, and lets S = 0 FedDST be checked against TFF's own FedAvg.
"""

import collections

import tensorflow as tf
import tensorflow_federated as tff

_WD_KEY = "weight_decay"


class _SGDW(tff.learning.optimizers.Optimizer):
  """Momentum SGD with PyTorch-style weight decay."""

  def __init__(self, learning_rate: float, momentum: float, weight_decay: float):
    if weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    self._sgdm = tff.learning.optimizers.build_sgdm(
        learning_rate=learning_rate, momentum=momentum or None
    )
    self._wd = weight_decay

  def initialize(self, specs):
    state = collections.OrderedDict(self._sgdm.initialize(specs))
    state[_WD_KEY] = self._wd
    return state

  def _inner(self, state):
    return collections.OrderedDict(
        (k, v) for k, v in state.items() if k != _WD_KEY
    )

  def next(self, state, weights, gradients):
    wd = state[_WD_KEY]
    gradients = tf.nest.map_structure(
        lambda g, w: g + tf.cast(wd, g.dtype) * w, gradients, weights
    )
    inner_state, new_weights = self._sgdm.next(
        self._inner(state), weights, gradients
    )
    new_state = collections.OrderedDict(inner_state)
    new_state[_WD_KEY] = wd
    return new_state, new_weights

  def get_hparams(self, state):
    hparams = collections.OrderedDict(self._sgdm.get_hparams(self._inner(state)))
    hparams[_WD_KEY] = state[_WD_KEY]
    return hparams

  def set_hparams(self, state, hparams):
    new_state = collections.OrderedDict(state)
    new_state.update(hparams)
    return new_state


def build_sgdw(
    learning_rate: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.001
) -> tff.learning.optimizers.Optimizer:
  """The clients' optimizer (paper defaults: lr 0.01, momentum 0.9, wd 1e-3)."""
  return _SGDW(learning_rate, momentum, weight_decay)
