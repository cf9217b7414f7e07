"""A cohort of clients trained as one TensorFlow computation.

G clients with the same network train at once: every parameter carries a
leading client axis [G, ...]; a convolution runs as one grouped convolution
(the clients' activations concatenated along channels, the filters grouped
so that client g sees only its own channels), a dense layer as a batched
matmul (`einsum('gbi,gio->gbo')`), a global average pooling as the mean of
every channel over H, W (then regrouped per client), and the loss is the sum over clients of
each client's mean loss, so that each client's gradient is its own. This is
the same arithmetic as training the clients one after the other
(`client_work.build_client_update`, the reference), in fewer, larger ops.

Data: `pack` stacks the clients' batches step by step: x [T, G, B, ...],
y [T, G, B] and valid [T, G, B] (1 for a real example). A client whose data
ran out (fewer or smaller batches: Dirichlet and natural partitions) has
padded entries; where a client has no example in a step it takes no step at
all (no momentum, no weight decay movement). What travels is smaller: each
client's distinct examples once (its local epochs reread the same ones) and
per step the indices into them, each step cut to its width (`Packed`).

Everything here is pure TensorFlow over tensors (no TFF): the TFF client
work wraps it.
"""

import collections
import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_feddst import masks as masks_lib
from tff_feddst import wrappers

_layers = tf.keras.layers


# ------------------------------------------------------------- the network


@dataclasses.dataclass(frozen=True)
class _Op:
  """One layer of the network, as the cohort computation runs it."""

  kind: str  # "conv", "dense", "pool", "activation", "flatten", "global_average"
  layer: tf.keras.layers.Layer
  param_index: tuple[int, ...] = ()  # kernel (and bias) in the parameter list
  fn: object = None  # an activation's function


def _ops(model: tf.keras.Model) -> list[_Op]:
  position = {id(v): i for i, v in enumerate(model.trainable_weights)}

  def index_of(*variables):
    return tuple(position[id(v)] for v in variables if v is not None)

  ops = []
  for wrapper in model.layers:
    layer = wrappers.unwrap(wrapper)
    if type(layer) is _layers.Conv2D:  # pylint: disable=unidiomatic-typecheck
      if layer.data_format != "channels_last" or layer.groups != 1:
        raise ValueError(f"cohort: conv layer {layer.name!r} must be channels_last, groups=1")
      ops.append(_Op("conv", layer, index_of(layer.kernel, layer.bias)))
    elif type(layer) is _layers.Dense:  # pylint: disable=unidiomatic-typecheck
      ops.append(_Op("dense", layer, index_of(layer.kernel, layer.bias)))
    elif isinstance(layer, (_layers.MaxPooling2D, _layers.AveragePooling2D)):
      ops.append(_Op("pool", layer))
    elif isinstance(layer, _layers.ReLU):
      if layer.max_value is not None or float(layer.negative_slope) or float(layer.threshold):
        raise ValueError(f"cohort: only the plain ReLU is supported ({layer.name!r})")
      ops.append(_Op("activation", layer, fn=tf.nn.relu))
    elif isinstance(layer, _layers.Activation):
      ops.append(_Op("activation", layer, fn=layer.activation))
    elif isinstance(layer, _layers.Flatten):
      ops.append(_Op("flatten", layer))
    elif type(layer) is _layers.GlobalAveragePooling2D:  # pylint: disable=unidiomatic-typecheck
      if layer.data_format != "channels_last" or layer.keepdims:
        raise ValueError(f"cohort: {layer.name!r} must be channels_last without keepdims")
      ops.append(_Op("global_average", layer))
    elif not isinstance(layer, _layers.InputLayer):
      raise ValueError(
          f"cohort: layer {layer.name!r} ({type(layer).__name__}) is not supported"
      )
  return ops


def check_grouped_convolutions() -> None:
  """Raises RuntimeError (one line) if grouped convolutions have no gradient.

  TensorFlow's default CPU kernels lack it; its oneDNN kernels have it
  (`TF_ENABLE_ONEDNN_OPTS=1` before TensorFlow is imported, which importing
  `tff_feddst` first arranges).
  """
  x = tf.ones([1, 3, 3, 2])
  kernel = tf.ones([1, 1, 1, 2])
  try:
    with tf.GradientTape() as tape:
      tape.watch(kernel)
      y = tf.nn.conv2d(x, kernel, 1, "VALID")
    tape.gradient(y, kernel).numpy()
  except tf.errors.InvalidArgumentError:
    raise RuntimeError(
        "the cohort engine needs TensorFlow's oneDNN kernels: set "
        "TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is imported (import tff_feddst "
        "first), or use --client_execution=per_client"
    ) from None


class CohortNetwork:
  """A Sequential Keras network (plain or wrapped) run for G clients at once.

  `logits(params, x)`: params in the model's `trainable_weights` order, each
  with a leading client axis; x [G, B, H, W, C]; returns [G, B, classes].
  """

  def __init__(self, model: tf.keras.Model):
    self._ops = _ops(model)
    self.num_params = len(model.trainable_weights)

  def logits(self, params: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    g = tf.shape(x)[0]
    # Images: [B, H, W, G * C], client g's channels at [g * C, (g + 1) * C).
    h = _to_grouped(x)
    grouped = True
    for op in self._ops:
      if op.kind == "flatten":
        h, grouped = _grouped_to_rows(h, g), False
      elif op.kind == "global_average":
        # Each channel's mean over H, W: [B, 1, 1, G * C] -> [G, B, C].
        h = tf.reduce_mean(h, axis=[1, 2], keepdims=True)
        h, grouped = _grouped_to_rows(h, g), False
      elif op.kind == "conv":
        h = _conv(op.layer, h, *[params[i] for i in op.param_index])
      elif op.kind == "dense":
        if grouped:
          h, grouped = _grouped_to_rows(h, g), False
        h = _dense(op.layer, h, *[params[i] for i in op.param_index])
      elif op.kind == "pool":
        pool = tf.nn.max_pool2d if isinstance(op.layer, _layers.MaxPooling2D) else tf.nn.avg_pool2d
        h = pool(h, op.layer.pool_size, op.layer.strides, op.layer.padding.upper())
      else:
        h = op.fn(h)
    return h


def _to_grouped(x):
  shape = tf.shape(x)
  h = tf.transpose(x, [1, 2, 3, 0, 4])  # [B, H, W, G, C]
  return tf.reshape(h, [shape[1], shape[2], shape[3], shape[0] * shape[4]])


def _grouped_to_rows(h, g):
  """[B, H, W, G * C] -> [G, B, H * W * C] (Keras' NHWC flatten per client)."""
  shape = tf.shape(h)
  h = tf.reshape(h, [shape[0], shape[1], shape[2], g, shape[3] // g])
  h = tf.transpose(h, [3, 0, 1, 2, 4])
  return tf.reshape(h, [g, shape[0], -1])


def _conv(layer, h, kernel, bias=None):
  """Grouped convolution: kernel [G, kh, kw, C_in, C_out] -> one conv2d."""
  shape = tf.shape(kernel)
  filters = tf.transpose(kernel, [1, 2, 3, 0, 4])
  filters = tf.reshape(filters, [shape[1], shape[2], shape[3], shape[0] * shape[4]])
  out = tf.nn.conv2d(
      h, filters, strides=layer.strides, padding=layer.padding.upper(),
      dilations=layer.dilation_rate,
  )
  if bias is not None:
    out = out + tf.reshape(bias, [-1])
  return layer.activation(out)


def _dense(layer, h, kernel, bias=None):
  # A batched matmul over clients ([G, B, I] x [G, I, O]); its gradients are
  # batched matmuls with transposed operands, which run about a third faster
  # here than those of the equivalent einsum (which transposes its operands).
  out = tf.linalg.matmul(h, kernel)
  if bias is not None:
    out = out + bias[:, tf.newaxis, :]
  return layer.activation(out)


# ------------------------------------------------------------- the data


@dataclasses.dataclass(frozen=True)
class Packed:
  """A cohort's batches, step by step (numpy arrays).

  Client g's examples are stored once, in `pool_x[g]` / `pool_y[g]`, whose
  entry 0 is all zeros (the padding); step t's batch of client g is
  `pool_x[g, index[t, g]]`, the entries with valid = 0 being padding.
  """

  pool_x: np.ndarray  # [G, P, ...]: entry 0 zeros, then the client's distinct examples
  pool_y: np.ndarray  # [G, P]
  index: np.ndarray  # [T, G, B] int32 into the client's pool (0: padding)
  valid: np.ndarray  # [T, G, B] float32, 1 for a real example
  first: np.ndarray  # [T, G, B] float32, 1 for a real example of the first epoch

  @property
  def x(self) -> np.ndarray:
    """The steps' images [T, G, B, ...] (zeros in the padding)."""
    return self.pool_x[np.arange(self.index.shape[1])[None, :, None], self.index]

  @property
  def y(self) -> np.ndarray:
    """The steps' labels [T, G, B] (0 in the padding)."""
    return self.pool_y[np.arange(self.index.shape[1])[None, :, None], self.index]

  @property
  def num_examples(self) -> np.ndarray:
    """Examples per client over all steps, [G]."""
    return self.valid.sum(axis=(0, 2)).astype(np.int64)

  @property
  def widths(self) -> np.ndarray:
    """Per step, the most examples a client has in it, [T]: the step's width."""
    return self.valid.sum(axis=2).max(axis=1).astype(np.int64)

  def value(self) -> collections.OrderedDict:
    """The cohort's TFF client value (numpy arrays; type `cohort_work.data_type`).

    Step t is cut to its width w_t (`widths`): the padding that no client
    fills is neither sent nor computed (with 40 examples and batch 32, every
    other step is 8 wide instead of 32). The value holds the pools and the
    steps' indices and flags end to end along the example axis ([G, sum_t
    w_t]; step t is [starts[t], ends[t])); `steps_dataset` builds the steps
    from it inside the cohort's TF computation, so the driver traces no
    per-step function for every cohort.
    """
    widths = self.widths
    ends = np.cumsum(widths)

    def end_to_end(a):  # [T, G, B] -> [G, sum_t w_t]
      return np.concatenate([a[t, :, :w] for t, w in enumerate(widths)], axis=1)

    return collections.OrderedDict(
        pool_x=self.pool_x, pool_y=self.pool_y,
        index=end_to_end(self.index), valid=end_to_end(self.valid),
        first=end_to_end(self.first), starts=ends - widths, ends=ends,
    )

  def dataset(self) -> tf.data.Dataset:
    """`steps_dataset` of `value` (outside TFF: the tests, benchmarks)."""
    return steps_dataset(self.value())


def steps_dataset(value) -> tf.data.Dataset:
  """One element per step: OrderedDict(x, y, valid, first) of [G, w_t, ...],
  from a cohort's value (`Packed.value`); each step's images are gathered
  from the pools as it is read."""
  pool_x, pool_y, index, valid, first = (
      tf.convert_to_tensor(value[k]) for k in ("pool_x", "pool_y", "index", "valid", "first")
  )

  def step(start, end):
    rows = index[:, start:end]
    return collections.OrderedDict(
        x=tf.gather(pool_x, rows, batch_dims=1),
        y=tf.gather(pool_y, rows, batch_dims=1),
        valid=valid[:, start:end],
        first=first[:, start:end],
    )

  return tf.data.Dataset.from_tensor_slices((value["starts"], value["ends"])).map(step)


def pack(client_epochs: Sequence[Sequence[Sequence[dict]]], batch_size: int) -> Packed:
  """Stacks the clients' batches step by step.

  `client_epochs[g]` is client g's list of epochs, each a list of batches
  ({"x", "y"} arrays, as its data set yields them). Client g's t-th batch
  (counting through its epochs) fills step t; the rest of the step, and the
  steps after its last batch, are padding (valid = 0). Equal (x, y) pairs of
  a client share one pool entry.
  """
  client_batches = [[b for epoch in epochs for b in epoch] for epochs in client_epochs]
  first_steps = [len(epochs[0]) if epochs else 0 for epochs in client_epochs]
  num_steps = max((len(b) for b in client_batches), default=0)
  example = next(batch for batches in client_batches for batch in batches)
  g = len(client_batches)
  x_example = np.asarray(example["x"])
  index = np.zeros((num_steps, g, batch_size), np.int32)
  valid = np.zeros((num_steps, g, batch_size), np.float32)
  pools = []
  for c, batches in enumerate(client_batches):
    slots, xs, ys = {}, [], []
    for t, batch in enumerate(batches):
      bx, by = np.asarray(batch["x"]), np.asarray(batch["y"])
      for b in range(len(by)):
        key = (bx[b].tobytes(), by[b].tobytes())
        if key not in slots:
          slots[key] = len(xs) + 1
          xs.append(bx[b])
          ys.append(by[b])
        index[t, c, b] = slots[key]
      valid[t, c, :len(by)] = 1.0
    pools.append((xs, ys))
  size = 1 + max(len(xs) for xs, _ in pools)
  pool_x = np.zeros((g, size, *x_example.shape[1:]), x_example.dtype)
  pool_y = np.zeros((g, size), np.asarray(example["y"]).dtype)
  for c, (xs, ys) in enumerate(pools):
    if xs:
      pool_x[c, 1:len(xs) + 1] = np.stack(xs)
      pool_y[c, 1:len(ys) + 1] = ys
  first = valid.copy()
  for c, steps in enumerate(first_steps):
    first[steps:, c] = 0.0
  return Packed(pool_x, pool_y, index, valid, first)


# ------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """The clients' optimizer: momentum SGD with PyTorch-style weight decay."""

  learning_rate: float
  momentum: float
  weight_decay: float
  prox_mu: float = 0.0


def _per_client_loss(logits, y, valid):
  """(mean loss per client [G], examples [G], correct [G]) of one step."""
  losses = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
  count = tf.reduce_sum(valid, axis=1)
  mean = tf.reduce_sum(losses * valid, axis=1) / tf.maximum(count, 1.0)
  hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float32)
  return mean, count, tf.reduce_sum(hits * valid, axis=1)


def _where_client(active, new, old):
  """Per client (leading axis): `new` where active, else `old`."""
  shape = tf.concat([tf.shape(active), tf.ones([tf.rank(new) - 1], tf.int32)], 0)
  return tf.where(tf.reshape(active, shape), new, old)


def _task_gradients(hp, params, grads, masks, anchor):
  """The gradients the optimizer applies: the FedProx term added, masked,
  then PyTorch-style weight decay (hp.weight_decay * w) added."""
  out = []
  for w, grad, mask, w0 in zip(params, grads, masks, anchor):
    if hp.prox_mu:
      grad = grad + hp.prox_mu * (w - w0)
    if mask is not None:
      grad = grad * mask
    out.append(grad + hp.weight_decay * w)
  return out


def _step_gradients(network, params, batch):
  """One step's gradients of the sum of the clients' mean losses with
  respect to `params`, and per client [G]: (mean loss, examples, correct)."""
  with tf.GradientTape() as tape:
    tape.watch(params)
    mean, count, correct = _per_client_loss(
        network.logits(params, batch["x"]), batch["y"], batch["valid"]
    )
    objective = tf.reduce_sum(mean)
  return tape.gradient(objective, params), mean, count, correct


def _add_totals(totals, mean, count, correct):
  """(examples, loss_sum, correct) [G] after one more step (`train`)."""
  return (totals[0] + count, totals[1] + mean * count, totals[2] + correct)


def _sgdw_step(hp, active, params, velocity, grads, masks, anchor, some_idle: bool = False):
  """One optimizer step of every active client (others keep everything).

  When every client is active (equal clients: every step), the selection
  of the inactive clients' old values is skipped: it is an identity then,
  and it costs a pass over every parameter of every client per step.
  `some_idle`: the caller knows a client is inactive (`train`'s branch for
  such steps), so the selection is made without a `tf.cond` (whose other
  branch would never run, and costs tracing).
  """
  new_params, new_velocity = [], []
  for w, v, grad in zip(params, velocity, _task_gradients(hp, params, grads, masks, anchor)):
    v_next = hp.momentum * v + grad if hp.momentum else grad
    new_velocity.append(v_next)
    new_params.append(w - hp.learning_rate * v_next)

  def keep_inactive():
    return (
        tuple(_where_client(active, new, old) for new, old in zip(new_params, params)),
        tuple(_where_client(active, new, old) for new, old in zip(new_velocity, velocity)),
    )

  if some_idle:
    return keep_inactive()
  return tf.cond(
      tf.reduce_all(active), lambda: (tuple(new_params), tuple(new_velocity)), keep_inactive
  )


def train(network: CohortNetwork, hp: Hyperparameters, params, masks, steps, fused: bool = True):
  """Local training of a cohort (call inside a `tf.function`).

  params: [G, ...] tensors in the network's parameter order; masks: one per
  parameter, a [G, ...] 0/1 tensor for a masked kernel, None otherwise;
  steps: a `tf.data.Dataset` of `Packed` steps. Gradients (and the FedProx
  term, towards the initial params) are multiplied by the mask, so masked
  weights stay zero and their momentum never moves. Returns (params,
  totals) with totals = (examples, loss_sum, correct), each [G]: loss_sum
  adds each step's mean loss times its examples (Keras' `loss` metric).

  `fused` (the default): the parameters and their momentum live in
  variables of the computation, and a step in which every client has a
  batch updates each with TensorFlow's `ResourceApplyMomentum` (accum =
  momentum * accum + grad; var -= lr * accum: the same float32 operations
  in the same order as `_sgdw_step`, in one pass instead of four
  element-wise ops); a step with idle clients runs `_sgdw_step` on the
  variables' values. False: `_sgdw_step` on tensors every step (the
  reference: equal bit for bit where no graph optimisation regroups the
  arithmetic; in TFF's worker the two differ in the last bits, and
  `tests/test_cohort.py` compares them there to 1e-5).
  """
  if not fused:
    return _train_on_tensors(network, hp, params, masks, steps)
  anchor = list(params)
  g = tf.shape(params[0])[0]
  weights = [_LocalVariable(p) for p in params]
  velocity = [_LocalVariable(tf.zeros_like(p)) for p in params]
  lr = tf.constant(hp.learning_rate, tf.float32)
  momentum = tf.constant(hp.momentum, tf.float32)

  def step(totals, batch):
    current = [w.read() for w in weights]
    grads, mean, count, correct = _step_gradients(network, current, batch)
    active = count > 0

    def apply_all():
      task = _task_gradients(hp, current, grads, masks, anchor)
      ops = [
          tf.raw_ops.ResourceApplyMomentum(
              var=w.handle, accum=v.handle, lr=lr, grad=grad, momentum=momentum
          )
          for w, v, grad in zip(weights, velocity, task)
      ]
      with tf.control_dependencies(ops):
        return tf.constant(True)

    def some_idle():
      old_velocity = [v.read() for v in velocity]
      new_params, new_velocity = _sgdw_step(
          hp, active, current, old_velocity, grads, masks, anchor, some_idle=True
      )
      ops = [w.assign(x) for w, x in zip(weights, new_params)]
      ops += [v.assign(x) for v, x in zip(velocity, new_velocity)]
      with tf.control_dependencies(ops):
        return tf.constant(True)

    done = tf.cond(tf.reduce_all(active), apply_all, some_idle)
    with tf.control_dependencies([done]):
      return _add_totals(totals, mean, count, correct)

  zeros = tf.zeros([g])
  with tf.control_dependencies([w.initialized for w in weights + velocity]):
    totals = steps.reduce((zeros, zeros, zeros), step)
  with tf.control_dependencies(totals):
    return [w.read() for w in weights], totals


# TensorFlow's ResourceHandle::ANONYMOUS_NAME: a VarHandleOp with this
# shared name makes a new variable each time it runs, freed with its handle.
_ANONYMOUS = "cd2c89b7-88b7-44c8-ad83-06c2a9158347"


class _LocalVariable:
  """A variable that lives for one run of the computation that makes it.

  Built from raw ops (not `tf.Variable`, whose initial value TFF and
  `tf.function` lift out of the computation): each run of the graph gets a
  fresh anonymous variable, so cohorts that the worker trains at the same
  time never share one.
  """

  def __init__(self, value: tf.Tensor):
    self.shape, self.dtype = value.shape, value.dtype
    self.handle = tf.raw_ops.VarHandleOp(
        dtype=value.dtype, shape=value.shape, shared_name=_ANONYMOUS
    )
    self.initialized = self.assign(value)

  def read(self) -> tf.Tensor:
    value = tf.raw_ops.ReadVariableOp(resource=self.handle, dtype=self.dtype)
    value.set_shape(self.shape)
    return value

  def assign(self, value: tf.Tensor):
    return tf.raw_ops.AssignVariableOp(resource=self.handle, value=value)


def _train_on_tensors(network: CohortNetwork, hp: Hyperparameters, params, masks, steps):
  """`train` with the parameters and momentum as the loop's tensors."""
  anchor = list(params)
  g = tf.shape(params[0])[0]

  def step(state, batch):
    params, velocity, totals = state
    grads, mean, count, correct = _step_gradients(network, params, batch)
    params, velocity = _sgdw_step(hp, count > 0, params, velocity, grads, masks, anchor)
    return params, velocity, _add_totals(totals, mean, count, correct)

  zeros = tf.zeros([g])
  initial = (tuple(params), tuple(tf.zeros_like(p) for p in params), (zeros, zeros, zeros))
  params, _, totals = steps.reduce(initial, step)
  return list(params), totals


def gradient_sums(network: CohortNetwork, params, kernel_index, steps):
  """Per client, the sum over its first epoch's examples of the task-loss
  gradient of each kernel ([G, ...] each; call inside a `tf.function`)."""

  def add(sums, batch):
    with tf.GradientTape() as tape:
      tape.watch(params)
      logits = network.logits(params, batch["x"])
      losses = tf.keras.losses.sparse_categorical_crossentropy(
          batch["y"], logits, from_logits=True
      )
      objective = tf.reduce_sum(losses * batch["first"])
    grads = tape.gradient(objective, [params[i] for i in kernel_index])
    return tuple(s + grad for s, grad in zip(sums, grads))

  first_epoch = steps.take_while(lambda b: tf.reduce_any(b["first"] > 0))
  return first_epoch.reduce(tuple(tf.zeros_like(params[i]) for i in kernel_index), add)


def _select_rows(scores, k):
  """[G, N] 0/1: the k largest scores of every row (lower index wins ties)."""
  _, idx = tf.math.top_k(scores, k=k, sorted=False)
  rows = tf.broadcast_to(tf.range(tf.shape(scores)[0])[:, tf.newaxis], tf.shape(idx))
  return tf.scatter_nd(
      tf.stack([rows, idx], axis=-1), tf.ones(tf.shape(idx), tf.float32), tf.shape(scores)
  )


def readjust(weights, mask, gradient, k, rows: int = 1):
  """`masks.readjust` for every client at once (leading axis G).

  Per client: deactivate the k active positions of smallest |w|, then
  activate the k inactive ones of largest |gradient|; a newly active
  position starts at zero, one dropped and regrown keeps its value.
  With block masks (`rows` > 1, k a multiple of rows) whole blocks go and
  come, by their sums of |w| and |gradient| (`masks.pool_blocks`).
  Returns (new_mask, new_weights).
  """
  shape = tf.shape(weights)
  kernel = weights.shape[1:]  # one client's kernel shape (static)
  per_client = lambda t: tf.reshape(t, [shape[0], -1])  # noqa: E731
  # The choices are made on blocks (single entries when rows = 1).
  k = tf.cast(k, tf.int32) // rows
  w = per_client(masks_lib.pool_blocks(weights, rows, kernel))
  m = per_client(tf.cast(masks_lib.pool_blocks(mask, rows, kernel) > 0, mask.dtype))
  grad = per_client(masks_lib.pool_blocks(gradient, rows, kernel))
  neg_inf = tf.constant(-np.inf, w.dtype)
  pruned = m * (1.0 - _select_rows(tf.where(m > 0, -tf.abs(w), neg_inf), k))
  grown = tf.minimum(pruned + _select_rows(tf.where(pruned > 0, neg_inf, tf.abs(grad)), k), 1.0)
  if rows > 1:
    grid = tf.concat([shape[:1], masks_lib.grid_shape(kernel, rows)], 0)
    grown = masks_lib.expand_blocks(tf.reshape(grown, grid), rows, kernel)
  grown = tf.reshape(grown, shape)
  new_positions = grown * (1.0 - mask)
  new_w = weights * grown * (1.0 - new_positions)
  return grown, new_w
