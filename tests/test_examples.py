"""The examples and the comparison harness they use (benchmarks/harness/common.py) run end to
end at a tiny size on every backend."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")

sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "harness"))


def _arrays(n, seed):
    x = np.random.RandomState(seed).randn(n, 6, 6, 2).astype("float32")
    y = (x[:, :3, :3, 0].mean(axis=(1, 2)) > 0).astype("int32") + (x[:, 3:, 3:, 1].mean(axis=(1, 2)) > 0)
    return x, y


def _tiny_cnn():
    # One conv layer (4 filter modules) and a classifier (one module): quick to compile.
    inp = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    out = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(x))
    return keras.Model(inp, out)


def test_compare_runs_all_variants_and_writes_results(tmp_path):
    import common  # benchmarks/harness/common.py

    out = tmp_path / "cmp"
    results = common.compare(
        _tiny_cnn,
        _arrays(64, 0),
        _arrays(32, 1),
        optimizer_fn=lambda: keras.optimizers.Adam(1e-2),
        mat_options=dict(alpha=0.5, beta=1e-3, probe_every=2, probe_samples=4, ntk_output="sum"),
        multirate_options=dict(k=2),
        epochs=2,
        batch_size=16,
        out_dir=str(out),
        verbose=0,
        title="tiny",
    )
    assert list(results) == ["plain", "mat", "rand", "multirate"]
    plain = results["plain"]
    for name, r in results.items():
        assert len(r["epochs"]) == 2, name
        assert all(0.0 <= e["metric"] <= 1.0 for e in r["epochs"]), name
        flops = [e["train_flops"] for e in r["epochs"]]
        assert 0 < flops[0] < flops[1], (name, flops)
        assert r["best"] >= r["final"] - 1e-12 and r["best"] == max(e["metric"] for e in r["epochs"])
        assert r["target"] == plain["best"]
        assert r["at_equal_flops"] is None or 0.0 <= r["at_equal_flops"] <= 1.0
    # Same epochs and batches: masked variants never cost more than plain, and
    # the same analytic model counts them (MAT's first step trains everything).
    assert plain["flops_to_target"] is not None and plain["flops_ratio_to_target"] == 1.0
    for name in ("mat", "rand", "multirate"):
        assert results[name]["train_flops"] <= plain["train_flops"] * (1 + 1e-9), name
    assert results["mat"]["total_flops"] > results["mat"]["train_flops"]  # probes
    assert results["rand"]["total_flops"] == results["rand"]["train_flops"]  # no probe
    # Rand is compute-matched to MAT: the same number of active modules per family.
    for fam, active in results["mat"]["final_active"].items():
        assert sum(results["rand"]["final_active"][fam]) == sum(active), fam
    table = (out / "results.md").read_text()
    assert table.startswith("## tiny") and all(f"| {v} |" in table for v in results)
    saved = json.loads((out / "results.json").read_text())
    assert saved["records"]["plain"]["best"] == plain["best"]
    assert os.path.getsize(out / "val_vs_flops.png") > 1000
    assert os.path.getsize(out / "lambda_max.png") > 1000


def test_compare_rejects_bad_arguments(tmp_path):
    import common

    kw = dict(optimizer_fn=keras.optimizers.Adam, mat_options={}, epochs=1, out_dir=str(tmp_path), verbose=0)
    data = _arrays(8, 0)
    with pytest.raises(ValueError, match="variants"):
        common.compare(_tiny_cnn, data, data, variants=("plain", "sage"), **kw)
    with pytest.raises(ValueError, match="include 'mat'"):
        common.compare(_tiny_cnn, data, data, variants=("plain", "rand"), **kw)
    with pytest.raises(ValueError, match="mode"):
        common.compare(_tiny_cnn, data, data, mode="up", **kw)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(DATA, "cifar10-jpeg", "cifar-10-jpeg-q75.zip")),
    reason="needs the offline CIFAR-10 JPEG archive in ../shared/data (present on CI and dev machines)",
)
def test_vgg_cifar10_example_runs_offline(tmp_path):
    import vgg_cifar10

    argv = [
        "--data-dir", DATA, "--cache-dir", str(tmp_path / "cache"),
        "--train-samples", "256", "--val-samples", "128", "--depth", "11", "--width", "0.0625",
        "--epochs", "1", "--batch-size", "64", "--probe-every", "2", "--probe-samples", "4",
        "--ntk-output", "sum", "--out-dir", str(tmp_path / "out"), "--verbose", "0",
        # MAT only: compiling each variant's VGG step costs seconds; the harness runs all
        # four variants in test_compare_runs_all_variants_and_writes_results.
        "--variants", "mat",
    ]  # fmt: skip
    results = vgg_cifar10.main(argv)
    assert list(results) == ["mat"]
    # VGG11: 8 conv layers of filter modules (64 x 0.0625 = 4 in the first); the classifier is
    # in no module.
    families = results["mat"]["final_active"]
    assert (
        sorted(families) == [f"conv{i}/filters" for i in range(1, 9)] and len(families["conv1/filters"]) == 4
    )
    for r in results.values():
        assert 0.0 <= r["final"] <= 1.0 and r["train_flops"] > 0
    assert os.path.getsize(tmp_path / "out" / "results.md") > 100
    # The decoded subset is cached: a second load reads it and gives the same shuffled images.
    (a, _), _ = vgg_cifar10.load_cifar10(DATA, str(tmp_path / "cache"), 256, 128, 0, 0)
    (b, yb), _ = vgg_cifar10.load_cifar10(DATA, str(tmp_path / "cache2"), 256, 128, 0, 0)
    np.testing.assert_array_equal(a, b)
    assert len(set(yb.tolist())) == 10  # shuffled: every class among the first 256


def _find_augmentation(source, image, shift):
    """(flipped, dy, dx) such that `image` is `source`, maybe flipped, moved by (dy, dx) with
    zero fill; None if no such move gives `image`."""
    rows, cols = source.shape[:2]
    for flipped in (False, True):
        moved = source[:, ::-1] if flipped else source
        padded = np.pad(moved, ((shift, shift), (shift, shift), (0, 0)))
        for dy in range(2 * shift + 1):
            for dx in range(2 * shift + 1):
                if np.array_equal(padded[dy : dy + rows, dx : dx + cols], image):
                    return flipped, dy - shift, dx - shift
    return None


def test_vgg_augmentation_is_seeded_flip_and_shift():
    import vgg_cifar10

    rng = np.random.RandomState(0)
    x = rng.randint(1, 256, size=(40, 8, 8, 3)).astype("uint8")  # no zero pixel: fill is visible
    y = np.arange(40, dtype="int32")
    data = vgg_cifar10.AugmentedImages(x, y, batch_size=16, seed=3, shift=2)
    assert len(data) == 2  # whole batches only
    images, labels = data[1]
    assert images.shape == (16, 8, 8, 3) and images.dtype == np.float32 and len(set(labels.tolist())) == 16
    moves = [_find_augmentation(x[label].astype("float32"), image, 2) for image, label in zip(images, labels)]
    assert all(m is not None for m in moves), moves
    assert {m[0] for m in moves} == {False, True} and len({m[1:] for m in moves}) > 4
    again, again_labels = vgg_cifar10.AugmentedImages(x, y, batch_size=16, seed=3, shift=2)[1]
    np.testing.assert_array_equal(images, again)  # same seed and epoch: the same batch
    np.testing.assert_array_equal(labels, again_labels)
    data.on_epoch_end()
    assert not np.array_equal(data[1][1], labels)  # a new order each epoch


@pytest.mark.skipif(
    keras.config.backend() == "tensorflow", reason="checks that JAX and PyTorch runs import no TensorFlow"
)
def test_vgg_training_data_needs_no_tensorflow():
    code = (
        "import sys, numpy as np; sys.path.insert(0, 'examples'); import vgg_cifar10; "
        "x = np.zeros((64, 32, 32, 3), 'uint8'); y = np.zeros(64, 'int32'); "
        "model = vgg_cifar10.build_vgg(11, 0.0625); "
        "model.compile('adam', 'sparse_categorical_crossentropy'); "
        "model.fit(vgg_cifar10.AugmentedImages(x, y, 32, 0), epochs=1, verbose=0); "
        "print('tensorflow' in sys.modules)"
    )
    env = dict(os.environ, KERAS_BACKEND=keras.config.backend())
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "False"


# --------------------------------------------------------------------------------------
# Text examples: BERT and Switch MoE masked LM on WikiText-2 (examples/wikitext.py)
# --------------------------------------------------------------------------------------

WIKITEXT = os.path.join(DATA, "wikitext-2-raw")
needs_wikitext = pytest.mark.skipif(
    not os.path.isfile(os.path.join(WIKITEXT, "wiki.test.raw")),
    reason="needs the offline WikiText-2 copy in ../shared/data (present on CI and dev machines)",
)
# A few KB of real text, a 300-token vocabulary, 1 layer, hidden 32, sequences of 32 tokens;
# 4 steps, measurements at steps 0 and 3 (few distinct compiled steps: JAX compiles dominate).
TINY_TEXT = [
    "--data-dir", DATA, "--max-text-bytes", "12000", "--vocab", "300", "--seq", "32",
    "--train-samples", "32", "--val-samples", "16", "--batch-size", "16", "--epochs", "2",
    "--layers", "1", "--heads", "2", "--hidden", "32", "--probe-every", "3", "--probe-samples", "4",
    "--verbose", "0",
]  # fmt: skip


@pytest.fixture(scope="session")
def wordpiece_cache(tmp_path_factory):
    """One vocabulary cache per test session (learning it is the slow part)."""
    return str(tmp_path_factory.mktemp("wordpiece"))


@needs_wikitext
def test_wikitext_masked_arrays_are_seeded_and_cached(wordpiece_cache):
    import wikitext

    train, valid, description = wikitext.load_text(DATA, max_bytes=12000)
    assert "TEST split" in description and train[0] != valid[0]
    vocab = wikitext.wordpiece_vocabulary(train, 300, wordpiece_cache, verbose=0)
    assert vocab[:5] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] and len(vocab) <= 300
    assert wikitext.wordpiece_vocabulary(train, 300, wordpiece_cache) == vocab  # read from the cache
    pre = wikitext.make_preprocessor(vocab, 32)
    x, y, w = wikitext.masked_lm_arrays(pre, valid, max_sequences=8, seed=3)
    x2, y2, w2 = wikitext.masked_lm_arrays(pre, valid, max_sequences=8, seed=3)
    x3, _, _ = wikitext.masked_lm_arrays(pre, valid, max_sequences=8, seed=4)
    for key in x:
        np.testing.assert_array_equal(x[key], x2[key])
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x["mask_positions"], x3["mask_positions"])
    # [CLS] first, 30 text tokens, [SEP]; masked slots point at real tokens, labels are the originals.
    assert x["token_ids"].shape == (8, 32) and y.shape == w.shape == (8, wikitext.mask_selection_length(32))
    assert np.all(x["token_ids"][:, 0] == 1) and np.all(x["padding_mask"][:, :-1])
    clean, _, _ = wikitext.masked_lm_arrays(pre, valid, max_sequences=8, seed=3, copies=2)
    assert clean["token_ids"].shape == (16, 32)
    rows, slots = np.nonzero(w)
    positions = x["mask_positions"][rows, slots]
    assert np.all(positions >= 1) and np.all(positions <= 30) and np.all(y[rows, slots] >= 5)
    assert np.mean(x["token_ids"][rows, positions] == 4) > 0.5  # mostly [MASK] (80 % expected)


def _switch_reference(x, mask, router, w_in, b_in, w_out, b_out, capacity):
    """Top-1 routing with per-sequence capacity, token by token (numpy)."""
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    dropped = 0
    for b in range(x.shape[0]):
        load = np.zeros(router.shape[1], int)
        for s in range(x.shape[1]):
            e = int(np.argmax(probs[b, s]))
            if not mask[b, s]:
                continue
            if load[e] >= capacity:
                dropped += 1
                continue
            load[e] += 1
            h = np.maximum(x[b, s] @ w_in[e] + b_in[e], 0.0)
            out[b, s] = probs[b, s, e] * (h @ w_out[e] + b_out[e])
    return out, probs, dropped


def test_switch_feed_forward_matches_top1_reference():
    import moe_wikitext2

    rng = np.random.RandomState(0)
    layer = moe_wikitext2.SwitchFeedForward(3, 5, capacity_factor=1.0, aux_loss_weight=0.5, activation="relu")
    x = rng.randn(2, 6, 4).astype("float32")
    x[..., 0] = np.abs(x[..., 0]) + 1.0
    mask = np.ones((2, 6), bool)
    mask[1, -2:] = False
    layer.build(x.shape)
    router = rng.randn(4, 3).astype("float32")
    router[0] = [3.0, 0.0, 0.0]  # most tokens prefer expert 0: its capacity (2 per sequence) overflows
    weights = [router] + [rng.randn(*v.shape).astype("float32") for v in layer.weights[1:]]
    for v, value in zip(layer.weights, weights):
        v.assign(value)
    y = keras.ops.convert_to_numpy(layer(x, padding_mask=mask))
    expected, probs, dropped = _switch_reference(x, mask, *weights, capacity=layer.capacity(6))
    assert layer.capacity(6) == 2 and dropped > 0
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    routed = np.eye(3)[probs.argmax(-1)] * mask[..., None]
    fraction = routed.sum((0, 1)) / mask.sum()
    mean_prob = (probs * mask[..., None]).sum((0, 1)) / mask.sum()
    aux = 0.5 * 3 * np.sum(fraction * mean_prob)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(layer.losses[-1])), aux, rtol=1e-5)


def test_moe_model_modules_are_experts_and_heads():
    import moe_wikitext2

    import keras_mat
    from keras_mat import flops

    model = moe_wikitext2.build_moe(50, layers=2, heads=2, hidden=8, intermediate=16, experts=4, seq=12)
    keras_mat.annotate(model)
    groups = {g.name: g for g in keras_mat.get_groups(model)}
    for i in range(2):
        experts = groups[f"block{i}_moe/experts"]
        assert experts.kind == "expert" and experts.num_modules == 4 and len(experts.variables) == 4
        assert groups[f"block{i}_attention/heads"].num_modules == 2
    covered = {id(v) for g in groups.values() for v in g.variables}
    routers = [v for v in model.trainable_variables if "router" in v.path]
    assert len(routers) == 2 and not any(id(v) in covered for v in routers)  # always trained
    # FLOPs: one expert per token (top_k = 1); 12 tokens, hidden 8, expert width 16, router 8 x 4.
    shapes = {"token_ids": (12,), "padding_mask": (12,), "mask_positions": (3,)}
    report = flops.count_flops(model, 1, input_shapes=shapes, groups=keras_mat.get_groups(model))
    moe = [c for name, c in report.layers.items() if name.endswith("block0_moe")]
    assert moe and moe[0]["forward"] == 2 * 12 * (8 * 16 * 2 + 8 * 4)
    np.testing.assert_allclose(report.families["block0_moe/experts"], [2 * 12 * 8 * 16 * 2 / 4] * 4)


@needs_wikitext
@pytest.mark.parametrize("example", ["bert_wikitext2", "moe_wikitext2"])
def test_text_example_runs_offline(example, wordpiece_cache, tmp_path):
    module = __import__(example)
    # MAT only: each variant compiles its own steps (tens of seconds on JAX); the harness test
    # runs all four variants.
    argv = TINY_TEXT + ["--cache-dir", wordpiece_cache, "--variants", "mat"]
    argv += ["--out-dir", str(tmp_path)]
    results = module.main(argv)
    assert list(results) == ["mat"]
    for r in results.values():
        assert len(r["epochs"]) == 2 and np.isfinite(r["final"]) and 0 < r["final"] < 10  # ln(300) = 5.7
        assert r["train_flops"] > 0
    families = results["mat"]["final_active"]
    heads = [f for f in families if f.endswith("/heads")]
    assert len(heads) == 1 and len(families[heads[0]]) == 2
    if example == "moe_wikitext2":
        assert len(families["block0_moe/experts"]) == 4
    table = (tmp_path / "results.md").read_text()
    assert "| mat |" in table and "perplexity" in table
