"""`ModularAdaptiveOptimizer` and `wrap()`: masks as optimizer state and the
masked update of variables and of every optimizer slot that belongs to them.

The wrapper follows `keras.optimizers.LossScaleOptimizer`: it holds an inner
optimizer, builds it, exposes its own variables followed by the inner ones and
delegates `learning_rate` and `iterations`. It never touches the inner
`update_step` (Keras swaps in fused implementations on torch, and the JAX
trainer only calls `stateless_apply`). Masked slices keep their value bit for
bit whatever the inner optimizer does (weight decay, EMA, gradient
accumulation, fused torch kernels, loss scaling, clipping):

- a stateful `apply` snapshots the values a masked module must keep, runs the
  inner optimizer's normal apply and blends the result back with
  `keras.ops.where`;
- `stateless_apply` runs the inner apply in a `keras.StatelessScope` that
  blends every assignment as it is made (`_MaskingScope`), so that what the
  inner update reads back (Adam's new moments, say) is already the blended
  value. A compiled step then updates each variable and slot in place, as the
  plain step does, instead of keeping both the old and the new values alive.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_mat import backends
from keras_mat import groups as groups_lib
from keras_mat import policy as policy_lib
from keras_mat._keras_private import no_automatic_dependency_tracking
from keras_mat.baselines import MaskSchedule
from keras_mat.policy import expand_mask

_NTK_OUTPUTS = ("auto", "logits", "sum", "loss")
_THRESHOLD_SCOPES = ("auto", "global", "per_layer")
_POLICIES = ("mat", None)
#: Compiled eager policy updates, by configuration (see `_policy_update`).
_COMPILED_POLICIES = {}
# Policy state rewritten at each measurement, in `policy.PolicyState` field order.
_POLICY_KEYS = ("mask", "frozen", "lambda_init", "delta_prev", "delta_first")

# Order matters: it is the order of the variables in `optimizer.variables`,
# which is how Keras saves and restores optimizer state.
STATE_NAMES = ("mask", "frozen", "lambda_max", "lambda_init", "delta_prev", "delta_first")
_STATE_INIT = {
    "mask": 1.0,
    "frozen": 0.0,
    "lambda_max": 0.0,
    "lambda_init": 0.0,
    "delta_prev": 0.0,
    "delta_first": 0.0,
}


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


class _Conditions:
    """The broadcast keep-mask of each (family, axis, shape), built once per
    update: a variable and its optimizer slots share one (an eager step, as
    on PyTorch, pays per op)."""

    def __init__(self, keep):
        self.keep = keep
        self._built = {}

    def __call__(self, plan_entry, shape):
        key = (plan_entry, shape)
        if key not in self._built:
            i, axis = plan_entry
            self._built[key] = expand_mask(self.keep[i], shape, axis)
        return self._built[key]


class _MaskingScope(keras.StatelessScope):
    """A `StatelessScope` in which an assignment to a masked variable or slot
    keeps the masked modules' values from the scope's start.

    Every later read inside the scope (the variable update that reads Adam's
    moments after assigning them, say) sees the blended value. Where a module
    updates, the blended value is the assigned one, so what the inner update
    computes there is unchanged; where it is masked, the result is discarded
    by the variable's own blend. The compiled step thus holds one select per
    assignment, and XLA updates each buffer in place. A blend of the outputs
    after the update makes XLA recompute the new moments inside each
    variable's update and keep the old ones alive: on a small transformer
    (JAX, CPU; `benchmarks/masked_step.py`) its step held 58 more copies and
    compiled 0.15-0.2 s slower; this one compiles within 0.1 s of plain AdamW.
    """

    def __init__(self, state_mapping, conditions, plans):
        super().__init__(state_mapping=state_mapping)
        self._conditions = conditions
        self._plans = plans
        self._start = dict(self.state_mapping)

    def add_update(self, update):
        variable, value = update
        plan = self._plans.get(id(variable))
        if plan is not None:
            start = self._start.get(id(variable))
            if start is None:  # (every variable the inner apply may write is mapped)
                raise RuntimeError(
                    f"keras_mat: the inner optimizer wrote {variable.path!r}, which the masked "
                    "stateless update was not given a value for, so it cannot keep its masked modules"
                )
            value = ops.convert_to_tensor(value, dtype=start.dtype)
            value = ops.where(self._conditions(plan, tuple(value.shape)), value, start)
        super().add_update((variable, value))


#: Inner optimizers whose update reads each element of a variable and its
#: slots alone, so that a blend at assignment leaves every updated module's
#: result as it is (their exact types; a subclass may override `update_step`).
#: Lamb, Adafactor and Muon mix elements of a variable (norms, factored
#: moments, orthogonalization) and take the blend after the update.
_ELEMENTWISE = (
    keras.optimizers.SGD,
    keras.optimizers.Adam,
    keras.optimizers.AdamW,
    keras.optimizers.Adamax,
    keras.optimizers.Nadam,
    keras.optimizers.RMSprop,
    keras.optimizers.Adagrad,
    keras.optimizers.Adadelta,
    keras.optimizers.Ftrl,
    keras.optimizers.Lion,
)


def _scope_values(scope, variables, values):
    """The values `scope` holds for `variables`, `values` where it holds none."""
    out = [scope.get_current_value(v) for v in variables]
    return [ops.convert_to_tensor(old) if new is None else new for new, old in zip(out, values)]


@contextlib.contextmanager
def _quiet_missing_gradients(grads):
    # `None`: a variable the MAT step did not differentiate (all its modules
    # off). The inner apply leaves it and its slots as they are, as it should.
    with warnings.catch_warnings():
        if any(g is None for g in grads) and not all(g is None for g in grads):
            warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
        yield


def _optimizer_chain(optimizer):
    # LossScaleOptimizer-style nesting: the innermost optimizer owns the slots.
    chain = []
    while isinstance(optimizer, keras.optimizers.Optimizer):
        chain.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return chain


def host_int(value):
    """An int read from a counter: a Variable (mirrored ones included) or the
    computed `iterations` tensor of gradient accumulation."""
    numpy = getattr(value, "numpy", None)
    return int(np.asarray(numpy() if numpy is not None else ops.convert_to_numpy(value)))


def _variables_at(by_path, path):
    """The variables whose path is `path`, allowing for how Keras names
    variables after loading: a reloaded Sequential model drops the model-name
    prefix (`d1/kernel` for `sequential/d1/kernel`), and a renamed model
    changes it. Falls back to the longest unambiguous common suffix of path
    components."""
    if path in by_path:
        return by_path[path]
    parts = path.split("/")
    for start in range(1, len(parts)):
        suffix = "/".join(parts[start:])
        found = [v for p, vs in by_path.items() for v in vs if p == suffix or p.endswith("/" + suffix)]
        if found:
            return found
    return []


def _zero_filled(grads, values):
    # For inner optimizers that touch every variable on each apply (EMA,
    # gradient accumulation): a left-out variable gets a zero gradient, and
    # the masked update keeps it as it is.
    return [ops.zeros_like(v) if g is None else g for g, v in zip(grads, values)]


@keras.saving.register_keras_serializable(package="keras_mat")
class ModularAdaptiveOptimizer(keras.optimizers.Optimizer):
    """Wraps a Keras optimizer so that only the active modules are updated.

    Each module family found on the trained variables (see
    `keras_mat.annotate`) gets a per-module mask stored as optimizer
    variables. On every step the inner optimizer runs normally, then every
    slice of a variable that belongs to a masked (or frozen) module, and the
    matching slice of every optimizer slot of that variable (momenta,
    velocities, accumulators, EMA copies, gradient accumulators), is reset to
    its value before the step, bit for bit. Active slices get exactly what
    the inner optimizer computed. A module that becomes active again resumes
    from its own untouched slots. Variables that belong to no family are
    always updated.

    The masks are runtime state, not Python constants: changing them never
    retraces or recompiles a train step on JAX or TensorFlow.

    Notes:
        - Optimizers whose update couples slices of one variable (`Lamb`'s
          trust ratio, `Adafactor`'s RMS scaling, `Muon`'s orthogonalisation)
          compute the active slices from the whole variable, masked slices
          included: the step equals the inner step restricted to active
          modules. `clipnorm` and `global_clipnorm` likewise use the norm of
          all gradients, masked ones included; masked slices still do not
          move.
        - Slots whose shape differs from their variable (`Adafactor`'s
          factored accumulators) cannot be masked per slice: the wrapper
          raises at build time if such a variable is in a family with more
          than one module; one-module families are masked all-or-nothing.
        - Gradient accumulators of masked modules do not accumulate.
        - The wrapper's own variables (`mat_state`) are never changed by
          `apply`; the MAT training step (or the user) writes them.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap. It must
            not be built yet and must not be a `ModularAdaptiveOptimizer`.
        alpha: Float in `[0, 1)`. Threshold of the modular policy; `0`
            updates every alive module.
        beta: Positive float. Tolerance of the temporal policy.
        probe_every: Positive int. Measure `lambda_max` every this many steps.
        probe_samples: Positive int. Number of samples in the probe batch.
        warmup: Non-negative int. Every module is updated until this
            measurement.
        ntk_output: One of `"auto"`, `"logits"`, `"sum"`, `"loss"`: the scalar
            whose modular NTK is measured.
        threshold_scope: One of `"auto"`, `"global"`, `"per_layer"`.
        policy: `"mat"` to let the MAT training step update the masks,
            `None` to leave the masks to the user, or a mask schedule
            (`keras_mat.baselines.RandomModules`, `Multirate`) that sets the
            masks before each step (no lambda_max probe runs).
        skip_gradients: Bool. While every module of a variable is masked or
            frozen, `keras_mat.sync_trainable` (and `keras_mat.MATCallback`
            inside `fit`) make the variable non-trainable, so that the train
            step computes no weight gradient and no update for it. `False`
            keeps every variable trainable (masks then only hold updates).
        temporal: The clock of the temporal rule (see `keras_mat.wrap`).
        name: Optional name of the optimizer.
        **kwargs: Only accepted for deserialisation compatibility; base
            optimizer arguments such as `weight_decay` or `clipnorm` belong on
            the inner optimizer.

    Raises:
        TypeError: if `inner_optimizer` is not a Keras optimizer.
        ValueError: if `inner_optimizer` is already a
            `ModularAdaptiveOptimizer` or already built, or an option is out
            of range.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> _ = keras_mat.annotate(model, dense=True)
    >>> opt = ModularAdaptiveOptimizer(keras.optimizers.Adam(1e-3), alpha=0.3)
    >>> model.compile(optimizer=opt, loss="mse")
    """

    def __init__(
        self,
        inner_optimizer,
        alpha=0.5,
        beta=1e-3,
        probe_every=100,
        probe_samples=16,
        warmup=1,
        ntk_output="sum",
        threshold_scope="auto",
        policy="mat",
        skip_gradients=True,
        temporal="training",
        name=None,
        **kwargs,
    ):
        families_config = kwargs.pop("families", None)
        probe = kwargs.pop("probe", "fixed")  # older saved configs carry `probe="fixed"`
        if probe != "fixed":
            raise ValueError(
                "The probe set is given to keras_mat.MATCallback (its first `probe_samples` samples); "
                f"the optimizer takes no `probe` option. Received: probe={probe!r}"
            )
        for arg_name in (
            "learning_rate",
            "weight_decay",
            "clipnorm",
            "global_clipnorm",
            "clipvalue",
            "use_ema",
            "ema_momentum",
            "ema_overwrite_frequency",
            "loss_scale_factor",
            "gradient_accumulation_steps",
        ):
            if arg_name in kwargs:
                raise ValueError(
                    f"ModularAdaptiveOptimizer does not take `{arg_name}`: set it on the inner "
                    f"optimizer instead. Received: {arg_name}={kwargs[arg_name]!r}"
                )
        if kwargs:
            raise ValueError(f"Unrecognized arguments: {sorted(kwargs)}. Received: kwargs={kwargs!r}")
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`inner_optimizer` must be a keras.optimizers.Optimizer instance. "
                f"Received: inner_optimizer={inner_optimizer!r} of type {type(inner_optimizer).__name__}"
            )
        if any(isinstance(o, ModularAdaptiveOptimizer) for o in _optimizer_chain(inner_optimizer)):
            raise ValueError(
                "`inner_optimizer` is already a ModularAdaptiveOptimizer; wrap the plain optimizer "
                f"only once. Received: inner_optimizer={inner_optimizer.name!r}"
            )
        if inner_optimizer.built:
            raise ValueError(
                "`inner_optimizer` is already built; pass a fresh (unbuilt) optimizer so that the "
                f"wrapper can map its slots to their variables. Received: inner_optimizer={inner_optimizer.name!r}"
            )
        if not _is_number(alpha) or not 0.0 <= float(alpha) < 1.0:
            raise ValueError(f"`alpha` must be a float in [0, 1). Received: alpha={alpha!r}")
        if not _is_number(beta) or not math.isfinite(float(beta)) or float(beta) <= 0.0:
            raise ValueError(f"`beta` must be a finite float > 0. Received: beta={beta!r}")
        if not _is_int(probe_every) or probe_every < 1:
            raise ValueError(f"`probe_every` must be an int >= 1. Received: probe_every={probe_every!r}")
        if not _is_int(probe_samples) or probe_samples < 1:
            raise ValueError(
                f"`probe_samples` must be an int >= 1. Received: probe_samples={probe_samples!r}"
            )
        if not _is_int(warmup) or warmup < 0:
            raise ValueError(f"`warmup` must be an int >= 0. Received: warmup={warmup!r}")
        if not isinstance(ntk_output, str) or ntk_output not in _NTK_OUTPUTS:
            raise ValueError(
                f"`ntk_output` must be one of {_NTK_OUTPUTS}. Received: ntk_output={ntk_output!r}"
            )
        if not isinstance(threshold_scope, str) or threshold_scope not in _THRESHOLD_SCOPES:
            raise ValueError(
                f"`threshold_scope` must be one of {_THRESHOLD_SCOPES}. "
                f"Received: threshold_scope={threshold_scope!r}"
            )
        if isinstance(policy, dict):  # a serialized schedule (from get_config)
            policy = keras.saving.deserialize_keras_object(policy)
        if not (
            isinstance(policy, MaskSchedule)
            or policy is None
            or (isinstance(policy, str) and policy == "mat")
        ):
            raise ValueError(
                "`policy` must be 'mat', None or a keras_mat.baselines mask schedule. "
                f"Received: policy={policy!r}"
            )
        temporal = policy_lib.check_temporal(temporal)
        if not isinstance(skip_gradients, (bool, np.bool_)):
            raise ValueError(f"`skip_gradients` must be a bool. Received: skip_gradients={skip_gradients!r}")

        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.probe_every = int(probe_every)
        self.probe_samples = int(probe_samples)
        self.warmup = int(warmup)
        self.ntk_output = ntk_output
        self.threshold_scope = threshold_scope
        self.policy = policy
        self.skip_gradients = bool(skip_gradients)
        self.temporal = temporal
        # Families recorded in a saved config, used to re-attach module
        # families to a loaded model's variables (which carry no annotation).
        self._families_config = families_config
        self.families = []
        self.mat_state = {}
        self.num_measurements = None
        # Called once, on the training thread, the next time a train step
        # applies this optimizer: at trace time for a compiled step.
        self._on_next_apply = []

    # ----------------------------------------------------------------------------------
    # Building
    # ----------------------------------------------------------------------------------

    def _resolve_families(self, var_list):
        families = groups_lib.groups_from_variables(var_list)
        if families or not self._families_config:
            return families
        # No annotation (e.g. a model restored by `keras.models.load_model`):
        # rebuild the families recorded by `get_config`, matching by path.
        by_path = {}
        for v in var_list:
            by_path.setdefault(v.path, []).append(v)
        restored = []
        for spec in self._families_config:
            variables, axes = [], []
            for path, axis in spec["variables"]:
                matches = _variables_at(by_path, path)
                if len(matches) != 1:
                    raise ValueError(
                        f"Cannot re-attach module family {spec['name']!r}: "
                        f"{'no' if not matches else 'more than one'} trained variable has path {path!r}. "
                        "Call keras_mat.annotate(model) before the optimizer is built. "
                        f"Received: variable paths={sorted(by_path)}"
                    )
                variables.append(matches[0])
                axes.append(axis)
            group = groups_lib.ModuleGroup(
                spec["name"], variables, axes, spec["num_modules"], spec.get("kind", "custom")
            )
            for v, axis in zip(group.variables, group.axes):
                setattr(v, groups_lib._GROUP_ATTR, group)
                setattr(v, groups_lib._AXIS_ATTR, axis)
            restored.append(group)
        return restored

    def _build_inner(self, var_list):
        # Record reference -> slot for every slot made through
        # `add_variable_from_reference` (and hence `add_optimizer_variables`),
        # the public seam every built-in optimizer uses for per-variable state.
        chain = _optimizer_chain(self.inner_optimizer)
        records = []
        for opt in chain:
            original = opt.add_variable_from_reference

            def recording(reference_variable, name=None, initializer="zeros", _original=original):
                slot = _original(reference_variable, name=name, initializer=initializer)
                records.append((slot, reference_variable))
                return slot

            opt.__dict__["add_variable_from_reference"] = recording
        try:
            self.inner_optimizer.build(var_list)
        finally:
            for opt in chain:
                opt.__dict__.pop("add_variable_from_reference", None)
        slot_owner = {id(slot): ref for slot, ref in records}
        # Slots made with plain `add_variable` (Adafactor's factored
        # accumulators) live in per-variable lists parallel to `var_list`.
        var_ids = {id(v) for v in var_list}
        for opt in chain:
            for value in list(vars(opt).values()):
                if not isinstance(value, (list, tuple)) or len(value) != len(var_list):
                    continue
                if not all(x is None or isinstance(x, keras.Variable) for x in value):
                    continue
                if any(x is not None and id(x) in var_ids for x in value):
                    continue
                for slot, ref in zip(value, var_list):
                    if slot is not None:
                        slot_owner.setdefault(id(slot), ref)
        return slot_owner

    def build(self, var_list):
        """Builds the inner optimizer and creates the MAT state variables.

        Args:
            var_list: The trainable variables to optimize. Module families are
                read from their annotations (`keras_mat.annotate`); a restored
                optimizer re-attaches the families saved in its config.

        Raises:
            ValueError: if a slot of a variable in a family with more than
                one module does not have the variable's shape (it cannot be
                masked per module), or if a slot cannot be attributed to its
                variable.
        """
        if self.built:
            return
        var_list = list(var_list)
        families = self._resolve_families(var_list)
        if not families and var_list:
            raise ValueError(
                "ModularAdaptiveOptimizer found no module family among the variables it "
                "optimizes: call `keras_mat.annotate(model)` before the first training step "
                "(or pass explicit ModuleGroups to it). "
                f"Received: {len(var_list)} variables, none annotated"
            )
        # Outside `no_automatic_dependency_tracking`: inner optimizers (Nadam,
        # Adafactor) rely on attribute tracking to register their variables.
        slot_owner = self._build_inner(var_list)
        self._mat_build(var_list, families, slot_owner)
        groups_lib.mark_in_use(families, self)
        super().build(var_list)

    @no_automatic_dependency_tracking
    def _mat_build(self, var_list, families, slot_owner):
        family_index = {id(g): i for i, g in enumerate(families)}

        def plan_for(variable, owner):
            group, axis = groups_lib.group_of(owner)
            if group is None or id(group) not in family_index:
                return None
            i = family_index[id(group)]
            shape = tuple(variable.shape)
            if shape == tuple(owner.shape):
                return (i, axis)
            if group.num_modules == 1:
                return (i, None)
            raise ValueError(
                f"The inner optimizer {self.inner_optimizer.__class__.__name__} keeps a slot "
                f"{variable.path!r} of shape {shape} for variable {owner.path!r} of shape "
                f"{tuple(owner.shape)}, which cannot be masked per module. Use one module for "
                f"family {group.name!r} (e.g. annotate with whole-layer groups) or another optimizer. "
                f"Received: num_modules={group.num_modules}"
            )

        self._trainable_plan = [plan_for(v, v) for v in var_list]
        inner_vars = self.inner_optimizer.variables
        grouped_shapes = {tuple(v.shape) for v in var_list if groups_lib.group_of(v)[0] is not None}
        index = {id(v): k for k, v in enumerate(var_list)}
        # Per inner variable: its masking plan, and the index of the trainable
        # variable it belongs to (None: the inner optimizer's own, e.g.
        # `iterations`). A variable that gets no gradient in a step leaves its
        # slots untouched, so they need neither a snapshot nor a blend.
        inner_plan, inner_owner = [], []
        for v in inner_vars:
            owner = slot_owner.get(id(v))
            if owner is None:
                if tuple(v.shape) and tuple(v.shape) in grouped_shapes:
                    raise ValueError(
                        f"Cannot tell which model variable the inner optimizer variable {v.path!r} "
                        "belongs to, so it cannot be masked. Create per-variable state with "
                        f"`add_variable_from_reference`. Received: variable={v.path!r}"
                    )
                inner_plan.append(None)
                inner_owner.append(None)
            else:
                inner_plan.append(plan_for(v, owner))
                inner_owner.append(index.get(id(owner)))
        self._inner_plan = inner_plan
        self._inner_owner = inner_owner
        self._eager_cache = {}
        self._plan_by_id = {
            id(v): p
            for v, p in zip(list(var_list) + list(inner_vars), self._trainable_plan + inner_plan)
            if p is not None
        }
        # Blend at assignment (see `_MaskingScope`) where the inner optimizer
        # is elementwise and assigns through the scope (not a
        # LossScaleOptimizer, whose stateless apply runs under a condition).
        self._blends_in_scope = (
            backends.get().ASSIGNS_IN_STATELESS_SCOPE and type(self.inner_optimizer) in _ELEMENTWISE
        )
        # EMA (and its overwrite) and gradient accumulation act on *every*
        # variable the inner optimizer was built with, whatever subset one
        # apply gets: with them a left-out variable still needs the snapshot
        # and blend, so it gets a zero gradient instead.
        self._updates_every_variable = False
        opt = self.inner_optimizer
        while opt is not None:
            if getattr(opt, "use_ema", False) or getattr(opt, "gradient_accumulation_steps", None):
                self._updates_every_variable = True
            opt = getattr(opt, "inner_optimizer", None)

        self.families = list(families)
        self._family_sizes = [g.num_modules for g in families]
        self.num_measurements = self.add_variable(
            shape=(), dtype="int", initializer="zeros", aggregation="none", name="mat_num_measurements"
        )
        state = {}
        for i, g in enumerate(families):
            state[g.name] = {
                key: self.add_variable(
                    shape=(g.num_modules,),
                    dtype="float32",
                    initializer=keras.initializers.Constant(_STATE_INIT[key]),
                    aggregation="none",
                    name=f"mat_{key}_{i}",
                )
                for key in STATE_NAMES
            }
        self.mat_state = state
        self._state_list = [state[g.name] for g in families]

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    # ----------------------------------------------------------------------------------
    # Masked update
    # ----------------------------------------------------------------------------------

    def _keep_from_values(self, mask_values, frozen_values):
        return [
            ops.logical_and(ops.greater(m, 0.5), ops.less(f, 0.5)) for m, f in zip(mask_values, frozen_values)
        ]

    def active_masks(self):
        """Effective masks as boolean tensors, computed from the mask variables.

        Unlike `masks` this returns backend tensors and can be called inside a
        compiled step (on JAX, inside a `keras.StatelessScope` that maps
        `optimizer.variables` to their current values).

        Returns:
            A dict: family name -> boolean tensor of shape `(num_modules,)`,
            True for modules that the next step updates (`mask` and not
            `frozen`).
        """
        self._check_built("active_masks")
        keep = self._keep_from_values(
            [s["mask"] for s in self._state_list], [s["frozen"] for s in self._state_list]
        )
        return {g.name: k for g, k in zip(self.families, keep)}

    def _blend(self, conditions, plan, new_values, old_values):
        out = []
        for p, new, old in zip(plan, new_values, old_values):
            if p is None or old is None:
                out.append(new)
                continue
            new = ops.convert_to_tensor(new)
            cond = conditions(p, tuple(new.shape))
            out.append(ops.where(cond, new, ops.convert_to_tensor(old, dtype=new.dtype)))
        return out

    def _scale_gradients(self, grads, mask_values, variables=None):
        # A schedule with `scales_gradients` (Multirate's slow step) writes
        # mask values other than 1: they scale the gradients of their
        # modules. Masked slices (value 0) are restored after the update.
        if not getattr(self.policy, "scales_gradients", False):
            return grads
        plans = (
            self._trainable_plan if variables is None else [self._plan_by_id.get(id(v)) for v in variables]
        )
        out = []
        for p, g in zip(plans, grads):
            if p is None or g is None:
                out.append(g)
                continue
            i, axis = p
            g = ops.convert_to_tensor(g)
            scale = expand_mask(ops.convert_to_tensor(mask_values[i], "float32"), tuple(g.shape), axis)
            out.append(g * ops.cast(scale, g.dtype))
        return out

    def _live(self, live_t):
        # Inner variables the inner apply may change: slots of variables with
        # a gradient, and the inner optimizer's own variables.
        return [True if k is None else live_t[k] for k in self._inner_owner]

    def apply(self, grads, trainable_variables=None):
        """Applies `grads` to `trainable_variables` (default: all the variables
        the optimizer was built with), keeping masked modules bit for bit.

        Variables may be a subset of the built ones, in any order: the MAT
        training step passes only the variables it differentiated, so a
        fully masked variable costs no optimizer work at all (no update, no
        snapshot, its slots untouched). A `None` gradient skips its variable
        the same way (the inner optimizer's usual warning included). Inner
        optimizers with EMA or gradient accumulation touch every variable on
        every apply; with them, a left-out variable gets a zero gradient and
        the usual masked update instead.
        """
        # Build first (TensorFlow builds lazily inside the first apply).
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        self._applying()
        if not self.families:
            self.inner_optimizer.apply(grads, trainable_variables)
            return
        self._warn_if_undriven()
        tvars = self._trainable_variables
        grads = list(grads)
        if trainable_variables is None:
            given = list(range(len(tvars)))
            trainable_variables = tvars
        else:
            trainable_variables = list(trainable_variables)
            given = [self._get_variable_index(v) for v in trainable_variables]
        if len(grads) != len(given):
            raise ValueError(
                "`grads` and `trainable_variables` must have the same length. Received: "
                f"len(grads)={len(grads)}, len(trainable_variables)={len(given)}"
            )
        full = [None] * len(tvars)
        for k, g in zip(given, grads):
            full[k] = g
        if self._updates_every_variable:
            full = _zero_filled(full, [v.value for v in tvars])
            given, trainable_variables = list(range(len(tvars))), tvars
        live_t = [g is not None for g in full]
        live_i = self._live(live_t)
        kernel = backends.get()
        mask_values = [s["mask"].value for s in self._state_list]
        state_values = mask_values + [s["frozen"].value for s in self._state_list]
        # An eager step (PyTorch) reuses the broadcast masks while the mask
        # state is unwritten (they cost about 0.7 ms a step on a small
        # transformer, out of 2.5 ms for the whole masked update), and leaves
        # out of the snapshot and write-back the families with every module
        # updating (read once per write of the state).
        key = kernel.state_key(state_values)
        cached = self._eager_cache.get("conditions")
        if key is not None and cached is not None and cached[0] == key:
            _, conditions, all_kept, _ = cached
        else:
            n = len(mask_values)
            keep = self._keep_from_values(state_values[:n], state_values[n:])
            conditions = _Conditions(keep)
            all_kept = [False] * n
            if key is not None:
                all_kept = [bool(ops.convert_to_numpy(ops.all(k))) for k in keep]
            # (The tensors are held so that their ids stay theirs while cached.)
            self._eager_cache["conditions"] = (
                None if key is None else (key, conditions, all_kept, state_values)
            )
        ivars = self.inner_optimizer.variables
        # The blended variables: trainable ones with a gradient, and their slots.
        blended = [
            (p, v)
            for plan, variables, live in (
                (self._trainable_plan, tvars, live_t),
                (self._inner_plan, ivars, live_i),
            )
            for p, v, lv in zip(plan, variables, live)
            if p is not None and lv and not all_kept[p[0]]
        ]
        # Snapshot (a real copy: torch optimizers update in place).
        olds = kernel.copy_values([v for _, v in blended])
        full = self._scale_gradients(full, mask_values)
        self.inner_optimizer.apply([full[k] for k in given], trainable_variables)
        kernel.restore_masked(
            [v for _, v in blended], [conditions(p, tuple(v.shape)) for p, v in blended], olds
        )

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        if not self.built:
            raise ValueError(
                f"To call `stateless_apply`, {self.__class__.__name__} must be built (i.e. its "
                "variables must have been created). You can build it via "
                "`optimizer.build(trainable_variables)`."
            )
        optimizer_variables = list(optimizer_variables)
        if len(optimizer_variables) != len(self.variables):
            raise ValueError(
                "Argument `optimizer_variables` must be a list of tensors corresponding 1:1 to "
                f"{self.__class__.__name__}().variables. Received list with length "
                f"{len(optimizer_variables)}, but expected {len(self.variables)} variables."
            )
        trainable_variables = list(trainable_variables)
        if self.families and self._blends_in_scope:
            return self._stateless_apply_in_scope(optimizer_variables, grads, trainable_variables)
        if len(trainable_variables) != len(self._trainable_variables):
            return self._stateless_apply_subset(optimizer_variables, grads, trainable_variables)
        self._applying()
        if self.families:
            self._warn_if_undriven()
        n_own = len(self._variables)
        own_values = optimizer_variables[:n_own]
        inner_values = optimizer_variables[n_own:]
        trainable_variables = list(trainable_variables)
        if self.families:
            masks, frozen = self._mask_state(own_values)
            grads = self._scale_gradients(list(grads), masks)
        grads = list(grads)
        if self.families and self._updates_every_variable:
            grads = _zero_filled(grads, trainable_variables)
        live_t = [g is not None for g in grads]
        with _quiet_missing_gradients(grads):
            new_t, new_i = self.inner_optimizer.stateless_apply(inner_values, grads, trainable_variables)
        if self.families:
            keep = self._keep_from_values(masks, frozen)
            plan_t = [p if lv else None for p, lv in zip(self._trainable_plan, live_t)]
            plan_i = [p if lv else None for p, lv in zip(self._inner_plan, self._live(live_t))]
            conditions = _Conditions(keep)
            new_t = self._blend(conditions, plan_t, new_t, trainable_variables)
            new_i = self._blend(conditions, plan_i, new_i, inner_values)
        # Values may be Variables when a LossScaleOptimizer nests the wrapper
        # (it passes `inner_optimizer.variables` inside its StatelessScope).
        own_values = [ops.convert_to_tensor(x) for x in own_values]
        return list(new_t), own_values + list(new_i)

    def _mask_state(self, own_values):
        # The mask and frozen values among this optimizer's own variable values.
        position = {id(v): k for k, v in enumerate(self._variables)}
        masks = [ops.convert_to_tensor(own_values[position[id(s["mask"])]]) for s in self._state_list]
        frozen = [ops.convert_to_tensor(own_values[position[id(s["frozen"])]]) for s in self._state_list]
        return masks, frozen

    def _variables_for(self, values):
        # The variables `stateless_apply` got values for: all the optimizer was
        # built with, or the currently trainable ones, in that order.
        if len(values) == len(self._trainable_variables):
            return list(self._trainable_variables)
        variables = [v for v in self._trainable_variables if v.trainable]
        if len(variables) != len(values):
            raise ValueError(
                "`trainable_variables` must hold one value per variable the optimizer was built "
                f"with ({len(self._trainable_variables)}), or per currently trainable one "
                f"({len(variables)}). Received: {len(values)} values"
            )
        return variables

    def _stateless_apply_in_scope(self, optimizer_variables, grads, values):
        # The inner apply in a scope that blends each assignment (see
        # `_MaskingScope`), on every trainable variable the optimizer was built
        # with, or on the currently trainable ones (see `skip_gradients`).
        variables = self._variables_for(values)
        self._applying()
        self._warn_if_undriven()
        n_own = len(self._variables)
        own_values = [ops.convert_to_tensor(x) for x in optimizer_variables[:n_own]]
        inner_values = optimizer_variables[n_own:]
        masks, frozen = self._mask_state(own_values)
        grads = self._scale_gradients(list(grads), masks, variables)
        if self._updates_every_variable:
            grads = _zero_filled(grads, values)
        conditions = _Conditions(self._keep_from_values(masks, frozen))
        ivars = self.inner_optimizer.variables
        mapping = list(zip(variables, values)) + list(zip(ivars, inner_values))
        with _quiet_missing_gradients(grads), _MaskingScope(mapping, conditions, self._plan_by_id) as scope:
            self.inner_optimizer.apply(grads, variables)
        new_values = _scope_values(scope, variables, values)
        return new_values, own_values + _scope_values(scope, ivars, inner_values)

    def _call_on_next_apply(self, fn):
        """Calls `fn()` once, on the training thread, when a train step next
        applies this optimizer (at trace time where the step compiles)."""
        self._on_next_apply.append(fn)

    def _cancel_on_next_apply(self, fn):
        if fn in self._on_next_apply:
            self._on_next_apply.remove(fn)

    def _applying(self):
        calls, self._on_next_apply = self._on_next_apply, []
        for fn in calls:
            fn()

    def _warn_if_undriven(self):
        # Python-side (at trace time on JAX/TF, every step on torch): a MAT
        # policy nobody drives never changes the masks; say so once.
        if self.policy is None or getattr(self, "_driven", False) or getattr(self, "_warned_undriven", False):
            return
        self._warned_undriven = True
        warnings.warn(
            "keras_mat: this optimizer's policy changes the masks only through "
            "keras_mat.MATCallback (in fit) or keras_mat.measure (custom loops, train_on_batch); "
            "without them every module trains. Pass callbacks=[keras_mat.MATCallback(x_train)] to fit. "
            f"Received: policy={self.policy!r}",
            stacklevel=3,
        )

    def _stateless_apply_subset(self, optimizer_variables, grads, values):
        # A train step built while some variables were non-trainable (see
        # `skip_gradients`) passes only the trainable ones, in the order the
        # optimizer was built with. `apply` takes such a subset; run it in a
        # StatelessScope, as Keras's own `stateless_apply` runs `apply`.
        variables = self._variables_for(values)
        mapping = list(zip(variables, values)) + list(zip(self.variables, optimizer_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.apply(grads, variables)
        return (
            _scope_values(scope, variables, values),
            _scope_values(scope, self.variables, optimizer_variables),
        )

    # ----------------------------------------------------------------------------------
    # Measurements and masks (the MAT policy; this optimizer owns its state)
    # ----------------------------------------------------------------------------------

    def should_measure(self):
        """Whether the coming optimizer step is a MAT measurement step.

        True when `policy="mat"` and `iterations` is a multiple of
        `probe_every` (the first step included). Host-side: call it outside
        compiled code, e.g. in a custom training loop before the step.

        Returns:
            A Python bool.
        """
        if not isinstance(self.policy, str):
            return False
        return host_int(self.iterations) % self.probe_every == 0

    def _check_lambda_max(self, lambda_max):
        if not isinstance(lambda_max, dict) or set(lambda_max) != set(self.mat_state):
            got = sorted(lambda_max) if isinstance(lambda_max, dict) else type(lambda_max).__name__
            raise ValueError(
                f"`lambda_max` must be a dict with one entry per module family {sorted(self.mat_state)}. "
                f"Received: lambda_max keys={got}"
            )
        out = []
        for g in self.families:
            value = np.asarray(ops.convert_to_numpy(lambda_max[g.name]), dtype="float32")
            if value.shape != (g.num_modules,):
                raise ValueError(
                    f"`lambda_max[{g.name!r}]` must have shape ({g.num_modules},). "
                    f"Received: shape {value.shape}"
                )
            out.append(value)
        return out

    def _period(self, period):
        if period is None:
            return policy_lib.temporal_period(self.temporal, self.probe_every)
        if isinstance(period, bool) or not isinstance(period, (int, np.integer)) or period < 1:
            raise ValueError(f"`period` must be an int >= 1. Received: period={period!r}")
        return int(period)

    def _policy_fn(self, period, compiled):
        # One measurement on the flat layout: `lam` is the (M,) concatenation
        # of every family's lambda_max and `state` five (M,) vectors.
        scopes = policy_lib.scope_ids([g.kind for g in self.families], self.threshold_scope)
        layout = policy_lib.module_scopes(self._family_sizes, scopes)
        alpha, beta, warmup = self.alpha, self.beta, self.warmup

        def pure(lam, state, measurement):
            old = policy_lib.PolicyState(*state, measurement=ops.cast(measurement, "int32"))
            lam = ops.cast(lam, "float32")
            new = policy_lib.policy_update_flat(lam, old, alpha, beta, layout, warmup=warmup, period=period)
            return tuple(new[:5]), new.measurement, lam

        if not compiled:
            return pure
        # Eagerly the policy is a few dozen tiny ops: one compiled function
        # runs them at once, shared by every optimizer of the same
        # configuration in the process.
        key = (backends.name(), tuple(scopes), alpha, beta, warmup, period, tuple(self._family_sizes))
        if key not in _COMPILED_POLICIES:
            # Its run time is microseconds either way: compile it the fast way.
            _COMPILED_POLICIES[key] = backends.get().compile_probe(pure, xla=True, fast=True)
        return _COMPILED_POLICIES[key]

    def _policy_update(self, lam, state, measurement, period, compiled=False):
        masks, measurement, lam = self._policy_fn(period, compiled)(lam, list(state), measurement)
        return policy_lib.PolicyState(*masks, measurement=measurement), lam

    def _host_policy_inputs(self):
        sv = self._state_list
        state = [
            np.concatenate([np.asarray(ops.convert_to_numpy(s[k].value), "float32") for s in sv])
            for k in _POLICY_KEYS
        ]
        return state, np.asarray(host_int(self.num_measurements), "int32")  # mirrored variables too

    def _policy_warmer(self, period=None):
        # A callable that compiles `update_masks`'s policy for `period` (for
        # a thread off the training loop). It holds host copies of inputs of
        # the types `update_masks` passes, and changes no state.
        state, measurement = self._host_policy_inputs()
        fn = self._policy_fn(self._period(period), True)
        return lambda: fn(np.zeros_like(state[0]), state, measurement)

    def update_masks(self, lambda_max, period=None):
        """Runs one MAT measurement: the temporal, then the modular policy.

        Writes the new masks, the stopped modules and the policy state into
        this optimizer's variables and advances the measurement counter. A
        measurement with a non-finite `lambda_max` changes nothing and
        returns `None` (the next good one takes its place). Under data
        parallelism, pass the same `lambda_max` on every replica: the policy
        is deterministic, so every replica then holds the same masks.

        On JAX inside `fit`, Keras keeps the state outside the variables
        between steps: `keras_mat.MATCallback` syncs it first; a callback of
        your own must call `model.jax_state_sync()` before this.

        Args:
            lambda_max: A dict: family name -> array-like of shape
                `(num_modules,)` for every family, e.g. what
                `keras_mat.module_lambda_max` returns.
            period: Measurements per step `t` of the temporal rule. `None`
                derives it from `temporal` without knowing the training
                length (`keras_mat.policy.temporal_period`); `MATCallback`
                passes the period of the planned `fit`.

        Returns:
            The effective masks after the update (`self.masks`), or `None`
            when `lambda_max` was not finite.

        Raises:
            ValueError: if the optimizer is not built, `policy` is not
                `"mat"`, or `lambda_max` misses a family or has a wrong shape.

        Example:

        >>> lam = keras_mat.module_lambda_max(model, x_probe)  # doctest: +SKIP
        >>> masks = model.optimizer.update_masks(lam)  # doctest: +SKIP
        """
        self._check_built("update_masks")
        if not isinstance(self.policy, str):
            raise ValueError(
                "`update_masks` runs the MAT policy, but this optimizer's masks come from "
                f"elsewhere. Received: policy={self.policy!r}"
            )
        lam = self._check_lambda_max(lambda_max)
        if not all(np.all(np.isfinite(v)) for v in lam):
            return None
        sv = self._state_list
        # Host-side concatenation: the compiled policy sees one vector per
        # quantity, whatever the number of families.
        state, measurement = self._host_policy_inputs()
        new, lam = self._policy_update(
            np.concatenate([np.asarray(v, "float32") for v in lam]),
            state,
            measurement,
            self._period(period),
            compiled=True,
        )
        for key, flat in zip(_POLICY_KEYS + ("lambda_max",), (*new[:5], lam)):
            for s, value in zip(
                sv, np.split(np.asarray(ops.convert_to_numpy(flat)), np.cumsum(self._family_sizes)[:-1])
            ):
                s[key].assign(value)
        self.num_measurements.assign(ops.cast(new.measurement, self.num_measurements.dtype))
        return self.masks

    def stateless_update_masks(self, optimizer_variables, lambda_max, period=None):
        """Stateless `update_masks`, for JAX custom training loops.

        Args:
            optimizer_variables: The current values of `self.variables`.
            lambda_max: As in `update_masks`; it may hold traced tensors.
                A non-finite entry leaves the state unchanged.
            period: As in `update_masks`.

        Returns:
            The new values of `self.variables` (a list).
        """
        self._check_built("stateless_update_masks")
        if not isinstance(self.policy, str):
            raise ValueError(
                "`stateless_update_masks` runs the MAT policy, but this optimizer's masks come "
                f"from elsewhere. Received: policy={self.policy!r}"
            )
        if not isinstance(lambda_max, dict) or set(lambda_max) != set(self.mat_state):
            self._check_lambda_max(lambda_max)  # raises the error naming the families
        values = list(optimizer_variables)
        position = {id(v): i for i, v in enumerate(self.variables)}
        sv = self._state_list
        state = [policy_lib.flatten_families([values[position[id(s[k])]] for s in sv]) for k in _POLICY_KEYS]
        lam = policy_lib.flatten_families([ops.cast(lambda_max[g.name], "float32") for g in self.families])
        new, lam = self._policy_update(
            lam, state, values[position[id(self.num_measurements)]], self._period(period)
        )
        for key, flat in zip(_POLICY_KEYS + ("lambda_max",), (*new[:5], lam)):
            for s, value in zip(sv, policy_lib.split_families(flat, self._family_sizes)):
                i = position[id(s[key])]
                values[i] = ops.cast(value, values[i].dtype)
        i = position[id(self.num_measurements)]
        values[i] = ops.cast(new.measurement, values[i].dtype)
        return values

    def follow_schedule(self, step, before_write=None):
        """Writes the masks of a mask schedule (`policy=RandomModules(...)`,
        `Multirate(...)`) for optimizer step `step`.

        Args:
            step: The optimizer step the masks are for (an int).
            before_write: Optional callable run just before the masks are
                written, only when they change (on JAX inside `fit`:
                `model.jax_state_sync`).

        Returns:
            True if the masks changed.

        Raises:
            ValueError: if `policy` is not a mask schedule.
        """
        self._check_built("follow_schedule")
        if not isinstance(self.policy, MaskSchedule):
            raise ValueError(
                f"`follow_schedule` needs a mask schedule as `policy`. Received: policy={self.policy!r}"
            )
        masks = self.policy.masks(int(step), [(g.name, g.num_modules) for g in self.families])
        written = getattr(self, "_schedule_written", None)
        if written is not None and all(np.array_equal(a, b) for a, b in zip(masks, written)):
            return False
        if before_write is not None:
            before_write()
        for s, m in zip(self._state_list, masks):
            s["mask"].assign(np.asarray(m, "float32"))
        self._schedule_written = [np.array(m) for m in masks]
        return True

    def skippable_variables(self):
        """The trained variables whose every module is masked or frozen.

        With `skip_gradients=True` these are the variables that
        `keras_mat.sync_trainable` makes non-trainable until a module of
        theirs is active again. Host-side (reads the mask variables).

        Returns:
            A list of `keras.Variable`, in the order the optimizer was built
            with; empty with `skip_gradients=False`.
        """
        self._check_built("skippable_variables")
        if not self.skip_gradients or not self.families or self._updates_every_variable:
            return []
        active = self.masks
        off = {id(g) for g in self.families if not np.any(active[g.name])}
        return [v for v in self._trainable_variables if id(groups_lib.group_of(v)[0]) in off]

    @property
    def skipped_variables(self):
        """The variables this optimizer has made non-trainable (see
        `skip_gradients`); they become trainable again as soon as a module of
        theirs is active and `keras_mat.sync_trainable` runs."""
        skipped = getattr(self, "_skipped", ())
        return [v for v in self._trainable_variables if id(v) in skipped] if self.built else []

    def _set_skipped(self, variables):
        # The one writer of `trainable` flags: makes exactly `variables`
        # non-trainable among those this optimizer controls, and makes the
        # ones it turned off before trainable again. Returns whether any
        # flag changed. Callers rebuild compiled train steps on a change
        # (`keras_mat.sync_trainable`).
        if not hasattr(self, "_skipped"):
            self._skipped = set()  # ids only: Keras tracks Variables held in attributes
        want = {id(v) for v in variables}
        changed = False
        for v in self._trainable_variables:
            if id(v) in want and id(v) not in self._skipped:
                if not v.trainable:
                    continue  # the user froze it: not ours to manage
                v.trainable = False
                self._skipped.add(id(v))
                changed = True
            elif id(v) not in want and id(v) in self._skipped:
                v.trainable = True
                self._skipped.discard(id(v))
                changed = True
        return changed

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from the inner optimizer's weight decay.

        Forwarded to the inner optimizer, which applies the decay; see
        `keras.optimizers.Optimizer.exclude_from_weight_decay`. Call it
        before the optimizer is built.
        """
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    # ----------------------------------------------------------------------------------
    # Delegation
    # ----------------------------------------------------------------------------------

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def _clip_gradients(self, grads):
        # Clipping is configured on (and applied by) the inner optimizer.
        return self.inner_optimizer._clip_gradients(grads)

    def __getattr__(self, name):
        # Reached only for attributes the wrapper does not have: the inner
        # optimizer's own state (e.g. its EMA copies) reads through.
        if name.startswith("__") or name in ("inner_optimizer", "_tracker"):
            raise AttributeError(name)
        inner = self.__dict__.get("inner_optimizer")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    # ----------------------------------------------------------------------------------
    # Public state
    # ----------------------------------------------------------------------------------

    def _check_built(self, what):
        if not self.built:
            raise ValueError(
                f"`{what}` needs a built optimizer: call `optimizer.build(model.trainable_variables)` "
                f"or train one step first. Received: optimizer={self.name!r} (not built)"
            )

    @property
    def masks(self):
        """Effective masks: family name -> boolean numpy array, True = updated.

        A module is updated when its `mask` is 1 and it is not `frozen`.

        On JAX, inside `model.fit` Keras keeps the state outside the
        variables between steps: call `model.jax_state_sync()` before reading
        this from a callback.
        """
        self._check_built("masks")
        return {
            g.name: (np.asarray(s["mask"].numpy()) > 0.5) & (np.asarray(s["frozen"].numpy()) < 0.5)
            for g, s in zip(self.families, self._state_list)
        }

    @property
    def frozen(self):
        """Permanently stopped modules: family name -> boolean numpy array."""
        self._check_built("frozen")
        return {
            g.name: np.asarray(s["frozen"].numpy()) > 0.5 for g, s in zip(self.families, self._state_list)
        }

    @property
    def lambda_max(self):
        """Last measured `lambda_max`: family name -> float32 numpy array."""
        self._check_built("lambda_max")
        return {
            g.name: np.asarray(s["lambda_max"].numpy(), dtype="float32")
            for g, s in zip(self.families, self._state_list)
        }

    def set_masks(self, masks):
        """Sets the update masks of some families.

        On JAX, inside `model.fit` Keras keeps the state outside the
        variables between steps: call `model.jax_state_sync()` before calling
        this from a callback, otherwise the assignment is silently lost.

        Args:
            masks: A dict: family name -> boolean array-like of shape
                `(num_modules,)`, True for modules to update. Families not
                listed keep their masks. Frozen modules stay frozen.

        Raises:
            ValueError: on an unknown family name, a wrong shape or values
                other than 0/1, or if the optimizer is not built.

        Example:

        >>> opt.set_masks({"mha/heads": [True, False]})  # doctest: +SKIP
        """
        self._check_built("set_masks")
        if not isinstance(masks, dict):
            raise ValueError(
                f"`masks` must be a dict: family name -> boolean array. Received: masks={masks!r}"
            )
        checked = {}
        for name, value in masks.items():
            if name not in self.mat_state:
                raise ValueError(
                    f"Unknown module family {name!r}; known families: {sorted(self.mat_state)}. "
                    f"Received: masks keys={sorted(masks)}"
                )
            array = np.asarray(value)
            size = self.mat_state[name]["mask"].shape[0]
            if array.shape != (size,):
                raise ValueError(
                    f"The mask of family {name!r} must have shape ({size},). "
                    f"Received: masks[{name!r}] of shape {array.shape}"
                )
            if array.dtype != bool:
                if not np.issubdtype(array.dtype, np.number) or not np.all((array == 0) | (array == 1)):
                    raise ValueError(
                        f"The mask of family {name!r} must be boolean (or 0/1). "
                        f"Received: masks[{name!r}]={value!r}"
                    )
            checked[name] = array.astype("float32")
        for name, array in checked.items():
            self.mat_state[name]["mask"].assign(array)

    # ----------------------------------------------------------------------------------
    # Serialisation
    # ----------------------------------------------------------------------------------

    def _families_spec(self):
        if self.built:
            return [
                {
                    "name": g.name,
                    "kind": g.kind,
                    "num_modules": g.num_modules,
                    "variables": [[v.path, axis] for v, axis in zip(g.variables, g.axes)],
                }
                for g in self.families
            ]
        return self._families_config

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "alpha": self.alpha,
            "beta": self.beta,
            "probe_every": self.probe_every,
            "probe_samples": self.probe_samples,
            "warmup": self.warmup,
            "ntk_output": self.ntk_output,
            "threshold_scope": self.threshold_scope,
            "policy": (
                keras.saving.serialize_keras_object(self.policy)
                if isinstance(self.policy, MaskSchedule)
                else self.policy
            ),
            "skip_gradients": self.skip_gradients,
            "temporal": self.temporal,
            "families": self._families_spec(),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.optimizers.deserialize(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def wrap(
    optimizer,
    *,
    alpha=0.5,
    beta=1e-3,
    probe_every=100,
    probe_samples=16,
    warmup=1,
    ntk_output="sum",
    threshold_scope="auto",
    policy="mat",
    skip_gradients=True,
    temporal="training",
    name=None,
):
    """Wraps `optimizer` for Modular Adaptive Training.

    Args:
        optimizer: A fresh `keras.optimizers.Optimizer`, or an identifier
            that `keras.optimizers.get` understands (`"adamw"`, a config
            dict).
        alpha: Float in `[0, 1)`, the modular threshold: a module is updated
            when its `lambda_max` is at least `lmin + alpha * (lmax - lmin)`
            of its scope. Defaults to `0.5`.
        beta: Positive float, the temporal tolerance: a module stops for good
            when the relative drift of its `lambda_max` falls below it.
            Defaults to `1e-3`.
        probe_every: Positive int: measure every this many optimizer steps.
            Defaults to `100`.
        probe_samples: Positive int: samples in the probe set. Defaults to
            `16`.
        warmup: Non-negative int: every module is updated until this
            measurement. Defaults to `1`.
        ntk_output: `"auto"`, `"logits"`, `"sum"` or `"loss"`: the scalar(s)
            whose modular NTK is measured. Defaults to `"sum"`: one row
            per sample; in the measured accuracy it is within noise of
            `"logits"`, which costs 15-25x more on CNNs.
        threshold_scope: `"auto"`, `"global"` or `"per_layer"`: which
            families share a threshold. Defaults to `"auto"`.
        policy: `"mat"` (measure and mask), `None` (masks are set by hand
            with `set_masks`) or a mask schedule (`keras_mat.RandomModules`,
            `keras_mat.Multirate`). Defaults to `"mat"`.
        skip_gradients: Skip the weight gradient and the update of a
            variable whose modules are all off. Defaults to `True`.
        temporal: The clock of the temporal rule: `"training"` (its step is
            a quarter of the planned training), `"epoch"`, `"measurement"`
            (every measurement), or an int (that many measurements). See
            `keras_mat.policy.temporal_period`. Defaults to `"training"`.
        name: Optional name of the optimizer.

    Returns:
        A `ModularAdaptiveOptimizer` around `optimizer`.

    Raises:
        TypeError: if `optimizer` is not a Keras optimizer or identifier.
        ValueError: if an option is invalid.

    Example:

    >>> opt = wrap(keras.optimizers.AdamW(1e-3), alpha=0.3, probe_every=50)
    >>> opt = wrap("adamw", probe_every=50)
    """
    if isinstance(optimizer, (str, dict)):
        try:
            optimizer = keras.optimizers.get(optimizer)
        except ValueError as err:
            raise ValueError(f"Unknown optimizer identifier. Received: optimizer={optimizer!r}") from err
    return ModularAdaptiveOptimizer(
        optimizer,
        alpha=alpha,
        beta=beta,
        probe_every=probe_every,
        probe_samples=probe_samples,
        warmup=warmup,
        ntk_output=ntk_output,
        threshold_scope=threshold_scope,
        policy=policy,
        skip_gradients=skip_gradients,
        temporal=temporal,
        name=name,
    )
