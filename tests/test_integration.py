"""How MAT plugs into Keras: no patching, subclassed steps, loading, cloning,
the import graph, and the reliability cases of the integration."""

import ast
import os
import re

import keras
import numpy as np
import pytest

import keras_mat
from keras_mat.training import find_mat_optimizer
from tests import models

BACKEND = keras.config.backend()
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "keras_mat")


def _sources():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    yield path, f.read()


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def test_import_graph_is_acyclic():
    graph = {}
    for path, text in _sources():
        name = _module_name(path)
        deps = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keras_mat"):
                # `from keras_mat import ntk` depends on the module ntk.
                subs = {f"{node.module}.{a.name}" for a in node.names}
                deps.update(subs if node.module == "keras_mat" else subs | {node.module})
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("keras_mat"))
        graph[name] = deps
    modules = set(graph)
    # The package's __init__ re-exports (it may import everything); edges into
    # "keras_mat" itself from a submodule would be a cycle through it.
    edges = {m: {d for d in deps if d in modules and d not in (m, "keras_mat")} for m, deps in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in edges[m]:
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
    assert "keras_mat.training" in modules and edges["keras_mat.training"]


def test_nothing_assigns_fit_train_step_or_call():
    pattern = re.compile(
        r"(__setattr__\([^)]*[\"'](fit|train_step|train_on_batch|__call__|call)[\"']"
        r"|\.(fit|train_step|train_on_batch|__call__)\s*=[^=]"
        r"|setattr\([^)]*[\"'](fit|train_step|train_on_batch|__call__|call)[\"'])"
    )
    offenders = [
        f"{path}:{i + 1}: {line.strip()}"
        for path, text in _sources()
        for i, line in enumerate(text.splitlines())
        if pattern.search(line)
    ]
    assert not offenders, offenders
    # keras.src is reached only through the adapter module.
    private = [
        path
        for path, text in _sources()
        if re.search(r"^\s*(from|import) keras\.src", text, re.M) and not path.endswith("_keras_private.py")
    ]
    assert not private, private


class OwnStepModel(keras.Model):
    """A subclass with its own train step (in Keras's documented style)."""

    def train_step(self, *args):
        if BACKEND == "jax":
            logs, state = super().train_step(*args)
            return {**logs, "own_step": 1.0}, state
        return {**super().train_step(*args), "own_step": 1.0}


def _own_step_model():
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh", name="fc0")(inp)
    out = keras.layers.Dense(3, name="fc1")(h)
    return keras_mat.annotate(models.set_weights_deterministic(OwnStepModel(inp, out)), dense=True)


def test_subclass_train_step_keeps_running_and_its_logs_with_a_layer_masked():
    m = _own_step_model()
    opt = keras_mat.wrap(keras.optimizers.Adam(1e-2), alpha=0.9, beta=1e-6, probe_every=2, probe_samples=4)
    m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(0)
    x, y = rng.randn(32, 6).astype("float32"), rng.randint(0, 3, 32)
    seen = []

    class Logs(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(
                (
                    "own_step" in logs,
                    [v.path for v in find_mat_optimizer(self.model.optimizer).skipped_variables],
                )
            )

    mat = keras_mat.MATCallback(x, recompile="always")
    m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[mat, Logs()])
    assert all(has for has, _ in seen)
    assert any(skipped for _, skipped in seen), "no layer was ever fully masked"
    # With a whole layer masked, the subclass's step ran and that layer stayed put.
    assert mat.step_cache_info()["skip_history"]


def test_cloned_model_says_why_it_does_not_train_with_mat():
    m = keras_mat.annotate(models.mlp(), dense=True)
    clone = keras.models.clone_model(m)
    clone.compile(optimizer=keras_mat.wrap("adam"), loss="mse")
    x = np.zeros((8, 4), "float32")
    with pytest.raises(ValueError, match="annotate"):
        clone.fit(x, np.zeros((8, 3), "float32"), verbose=0, callbacks=[keras_mat.MATCallback(x)])
    keras_mat.annotate(clone, dense=True)  # annotating the clone is the fix
    clone.fit(x, np.zeros((8, 3), "float32"), verbose=0, callbacks=[keras_mat.MATCallback(x)])
    assert [g.name for g in find_mat_optimizer(clone.optimizer).families] == ["fc0", "fc1"]


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_saved_model_reloads_with_its_families(tmp_path, kind):
    if kind == "sequential":
        m = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(5, name="d1"), keras.layers.Dense(3, name="d2")]
        )
    elif kind == "functional":
        m = models.mlp()
    else:
        m = _own_step_model()
    keras_mat.annotate(m, dense=True)
    m.compile(optimizer=keras_mat.wrap(keras.optimizers.Adam(1e-2), policy=None), loss="mse")
    x, y = np.ones((8, m.inputs[0].shape[1]), "float32"), np.ones((8, 3), "float32")
    m.fit(x, y, verbose=0)
    m.optimizer.set_masks({m.optimizer.families[0].name: [False]})
    path = str(tmp_path / f"{kind}.keras")
    m.save(path)
    custom = {"OwnStepModel": OwnStepModel} if kind == "subclassed" else None
    loaded = keras.models.load_model(path, custom_objects=custom)
    opt = loaded.optimizer
    assert [g.name for g in opt.families] == [g.name for g in m.optimizer.families]
    assert not opt.masks[opt.families[0].name].any()
    loaded.fit(x, y, verbose=0)  # trains with MAT: the masked family stays put
    for a, b in zip(m.optimizer.families[0].variables, opt.families[0].variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value)
        )


def test_gradient_accumulation_trains_with_mat():
    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=8), dense=True))
    inner = keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2)
    m.compile(
        optimizer=keras_mat.wrap(inner, alpha=0.9, beta=1e-6, probe_every=2, probe_samples=4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.RandomState(0)
    x, y = rng.randn(32, 6).astype("float32"), rng.randint(0, 3, 32)
    mat = keras_mat.MATCallback(x)
    hist = m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[mat])
    assert np.all(np.isfinite(hist.history["loss"]))
    assert mat.rows and not find_mat_optimizer(m.optimizer).skipped_variables
    # Accumulation touches every variable on each apply: nothing is skipped.
    assert mat.step_cache_info()["skip_history"] == []


@pytest.mark.skipif(BACKEND == "torch", reason="Keras on torch requires steps_per_execution=1.")
def test_steps_per_execution_logs_the_right_steps():
    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=8), dense=True))
    m.compile(
        optimizer=keras_mat.wrap(keras.optimizers.Adam(1e-2), probe_every=4, probe_samples=4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=2,
    )
    rng = np.random.RandomState(0)
    x, y = rng.randn(64, 6).astype("float32"), rng.randint(0, 3, 64)
    mat = keras_mat.MATCallback(x)
    m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[mat])
    assert sorted({r["step"] for r in mat.rows}) == [0, 4, 8, 12]
    assert int(find_mat_optimizer(m.optimizer).num_measurements.numpy()) == 4


def test_loss_probe_follows_a_new_compile():
    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=8), dense=True))
    rng = np.random.RandomState(0)
    x, y = rng.randn(16, 6).astype("float32"), rng.randn(16, 3).astype("float32")
    lams = []
    for loss in ("mse", "mae"):
        m.compile(
            optimizer=keras_mat.wrap(
                keras.optimizers.SGD(0.0), ntk_output="loss", probe_every=100, probe_samples=8
            ),
            loss=loss,
        )
        mat = keras_mat.MATCallback(x, y)
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[mat])
        lams.append([r["lambda_max"] for r in mat.rows])
    assert not np.allclose(lams[0], lams[1])


def test_non_finite_measurement_is_skipped_not_fatal():
    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=8), dense=True))
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = np.full((8, 6), np.nan, "float32")
    mat = keras_mat.MATCallback(x, probe_every=1, probe_samples=4)
    with pytest.warns(UserWarning, match="non-finite"):
        m.fit(
            np.ones((8, 6), "float32"), np.ones((8, 3), "float32"), batch_size=4, verbose=0, callbacks=[mat]
        )
    assert mat.rows == []


def test_keras_hub_task_resumes_with_backup_and_restore(tmp_path):
    # keras-hub tasks compile themselves, so `load_model` does not bring the
    # optimizer back. The supported resume: rebuild the task, compile it with
    # the same keras_mat optimizer, and fit with BackupAndRestore listed
    # before MATCallback (weights, slots, masks and policy state come back).
    import keras_hub

    def task():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=40,
            num_layers=2,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=6,
            dropout=0.0,
        )
        t = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None, dropout=0.0)
        keras_mat.annotate(t)
        opt = keras_mat.wrap(
            keras.optimizers.Adam(1e-2), alpha=0.5, beta=0.05, probe_every=2, probe_samples=4
        )
        t.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return t

    rng = np.random.RandomState(0)
    n = 16
    x = {
        "token_ids": rng.randint(1, 40, size=(n, 6)).astype("int32"),
        "segment_ids": np.zeros((n, 6), "int32"),
        "padding_mask": np.ones((n, 6), "int32"),
    }
    y = rng.randint(0, 2, n)
    fit = dict(batch_size=4, epochs=3, verbose=0, shuffle=False)

    straight = task()
    log_a = keras_mat.MATCallback(x)
    straight.fit(x, y, callbacks=[log_a], **fit)

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    backup = str(tmp_path / "backup")
    log_b = keras_mat.MATCallback(x)
    with pytest.raises(RuntimeError, match="interrupted"):
        task().fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup), log_b, Crash()], **fit)
    resumed = task()
    log_c = keras_mat.MATCallback(x)
    resumed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup), log_c], **fit)

    assert {r["step"] for r in log_c.rows} == {8, 10}  # resumed at epoch 2 (steps 8..11)
    key = lambda r: (r["step"], r["family"], r["module"])  # noqa: E731
    a = sorted(log_a.rows, key=key)
    b = sorted([r for r in log_b.rows if r["step"] < 8] + log_c.rows, key=key)
    assert [(r["step"], r["active"], r["frozen"]) for r in a] == [
        (r["step"], r["active"], r["frozen"]) for r in b
    ]
    np.testing.assert_allclose([r["lambda_max"] for r in a], [r["lambda_max"] for r in b], rtol=1e-4)
    opt_a, opt_c = straight.optimizer, resumed.optimizer
    assert int(opt_a.num_measurements.numpy()) == int(opt_c.num_measurements.numpy()) == 6
    for va, vc in zip(straight.trainable_variables, resumed.trainable_variables):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(va.value), keras.ops.convert_to_numpy(vc.value), rtol=1e-4, atol=1e-5
        )


def test_custom_loop_example_runs():
    import importlib.util

    path = os.path.join(os.path.dirname(PACKAGE), "examples", "custom_loop.py")
    spec = importlib.util.spec_from_file_location("custom_loop_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    opt = module.main(["--steps", "12", "--probe-every", "4", "--batch-size", "8"])
    assert int(opt.num_measurements.numpy()) == 3
    assert not opt.skipped_variables and all(v.trainable for v in opt._trainable_variables)
