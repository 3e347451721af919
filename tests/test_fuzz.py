"""Wrong types, wrong shapes and non-finite values fed to every public function.

Each case either raises a clear error (a ValueError or TypeError, or the
standard error the docstring names, whose message names the argument) or
shows the documented behaviour; never an internal traceback from deep inside
a library.
"""

import functools
import math

import keras
import numpy as np
import pytest

import keras_mat
from keras_mat import policy
from keras_mat.baselines import Multirate, PaperRand, RandomModules
from keras_mat.groups import mark_in_use
from tests import models

NAN, INF = float("nan"), float("inf")
BACKEND = keras.config.backend()


@functools.cache
def _mlp():
    return models.mlp()


@functools.cache
def _mha():
    return keras_mat.annotate(models.set_weights_deterministic(models.mha()))


def _x():
    return models.probe_batch(_mha(), 4)


def _kernel():
    return _mlp().get_layer("fc0").kernel  # shape (4, 5)


def _sgd():
    return keras.optimizers.SGD(0.1)


def _rows(value=1.0, **extra):
    return [
        dict(step=s, family="d", module=0, lambda_max=value, active=1, frozen=0, **extra) for s in (0, 10)
    ]


def _lam(**kwargs):
    return keras_mat.module_lambda_max(_mha(), kwargs.pop("x", None) if "x" in kwargs else _x(), **kwargs)


def _built_sgd():
    opt = _sgd()
    opt.build([keras.Variable(np.zeros(2))])
    return opt


def _truncated_csv(tmp_path):
    path = tmp_path / "mat.csv"
    path.write_text(
        "step,measurement,family,module,lambda_max,active,frozen,train_flops,total_flops\n"
        "0,0,d,0,1.0,1,0,0,0\n"
        "10,1,d,0,2.0,1,0,0,0\n"
        "20,2,d,0,3."
    )
    return path


def _case(id, call, errors=(ValueError, TypeError), match=None, marks=()):
    return pytest.param(call, errors, match, id=id, marks=marks)


# Every case: (call, accepted exception types, regex the message must match).
# The regex names the argument (and, where useful, the value).
RAISES = [
    # ---- annotate -------------------------------------------------------------------
    _case("annotate-model-int", lambda: keras_mat.annotate(3), TypeError, "model=3"),
    _case("annotate-model-None", lambda: keras_mat.annotate(None), TypeError, "model=None"),
    _case(
        "annotate-unbuilt",
        lambda: keras_mat.annotate(keras.Sequential([keras.layers.Dense(2)])),
        ValueError,
        r"model\.build\(input_shape\).*not built",
    ),
    _case(
        "annotate-groups-str",
        lambda: keras_mat.annotate(_mlp(), groups="heads"),
        ValueError,
        "groups='heads'",
    ),
    _case("annotate-groups-int", lambda: keras_mat.annotate(_mlp(), groups=7), ValueError, "groups=7"),
    _case(
        "annotate-groups-entry", lambda: keras_mat.annotate(_mlp(), groups=[3]), ValueError, "groups entry=3"
    ),
    _case(
        "annotate-exclude-int-entry", lambda: keras_mat.annotate(_mlp(), exclude=[42]), TypeError, "exclude"
    ),
    _case(
        "annotate-exclude-float", lambda: keras_mat.annotate(_mlp(), exclude=3.5), TypeError, "exclude=3.5"
    ),
    _case(
        "annotate-exclude-None", lambda: keras_mat.annotate(_mlp(), exclude=None), TypeError, "exclude=None"
    ),
    _case(
        "annotate-exclude-regex",
        lambda: keras_mat.annotate(_mlp(), exclude="fc("),
        ValueError,
        r"exclude.*'fc\('",
    ),
    _case(
        "annotate-conv_modules-0",
        lambda: keras_mat.annotate(_mlp(), conv_modules=0),
        ValueError,
        "conv_modules=0",
    ),
    _case(
        "annotate-conv_modules-nan",
        lambda: keras_mat.annotate(_mlp(), conv_modules=NAN),
        ValueError,
        "conv_modules=nan",
    ),
    _case(
        "annotate-conv_modules-inf",
        lambda: keras_mat.annotate(_mlp(), conv_modules=INF),
        ValueError,
        "conv_modules=inf",
    ),
    _case(
        "annotate-conv_modules-float",
        lambda: keras_mat.annotate(_mlp(), conv_modules=2.0),
        ValueError,
        "conv_modules=2.0",
    ),
    _case(
        "annotate-conv_modules-not-dividing",
        lambda: keras_mat.annotate(models.cnn(), conv_modules=4),
        ValueError,
        "conv_modules=4",
    ),
    _case("annotate-dense-str", lambda: keras_mat.annotate(_mlp(), dense="yes"), TypeError, "dense='yes'"),
    _case(
        "annotate-embeddings-None",
        lambda: keras_mat.annotate(_mlp(), embeddings=None),
        TypeError,
        "embeddings=None",
    ),
    _case(
        "annotate-norms-array",
        lambda: keras_mat.annotate(_mlp(), norms=np.array([True])),
        TypeError,
        "norms=",
    ),
    # ---- discover_groups / get_groups / mark_in_use ----------------------------------
    _case("discover-model-str", lambda: keras_mat.discover_groups("model"), TypeError, "model='model'"),
    _case(
        "discover-include-entry",
        lambda: keras_mat.discover_groups(_mlp(), include=["head", 3]),
        ValueError,
        "include=",
    ),
    _case(
        "discover-include-None",
        lambda: keras_mat.discover_groups(_mlp(), include=None),
        ValueError,
        "include=None",
    ),
    _case(
        "discover-conv_modules-neg",
        lambda: keras_mat.discover_groups(_mlp(), conv_modules=-1),
        ValueError,
        "conv_modules=-1",
    ),
    _case(
        "discover-exclude-bytes",
        lambda: keras_mat.discover_groups(_mlp(), exclude=[b"fc0"]),
        TypeError,
        "exclude",
    ),
    _case("get_groups-int", lambda: keras_mat.get_groups(3), TypeError, "model=3"),
    _case("get_groups-None", lambda: keras_mat.get_groups(None), TypeError, "model=None"),
    _case("mark_in_use-str", lambda: mark_in_use("g", object()), TypeError, "groups='g'"),
    _case("annotate_variables-str", lambda: keras_mat.annotate_variables("g"), TypeError, "groups='g'"),
    _case("annotate_variables-entry", lambda: keras_mat.annotate_variables([3]), TypeError, "groups entry=3"),
    _case(
        "annotate_variables-overlap",
        lambda: keras_mat.annotate_variables(
            [keras_mat.ModuleGroup("a", [_kernel()], 1, 5), keras_mat.ModuleGroup("b", [_kernel()], 0, 4)]
        ),
        ValueError,
        "overlap",
    ),
    # ---- ModuleGroup ----------------------------------------------------------------
    _case("group-name-None", lambda: keras_mat.ModuleGroup(None, [_kernel()]), ValueError, "name=None"),
    _case("group-name-empty", lambda: keras_mat.ModuleGroup("", [_kernel()]), ValueError, "name=''"),
    _case("group-variables-int", lambda: keras_mat.ModuleGroup("g", 5), TypeError, "variables=5"),
    _case(
        "group-variables-str", lambda: keras_mat.ModuleGroup("g", "kernel"), TypeError, "variables='kernel'"
    ),
    _case("group-variables-empty", lambda: keras_mat.ModuleGroup("g", []), ValueError, r"variables=\[\]"),
    _case(
        "group-variables-array",
        lambda: keras_mat.ModuleGroup("g", [np.zeros(3)]),
        TypeError,
        "variables entry=",
    ),
    _case("group-axes-str", lambda: keras_mat.ModuleGroup("g", [_kernel()], axes="1"), TypeError, "axes='1'"),
    _case("group-axes-nan", lambda: keras_mat.ModuleGroup("g", [_kernel()], axes=NAN), TypeError, "axes=nan"),
    _case(
        "group-axes-length", lambda: keras_mat.ModuleGroup("g", [_kernel()], axes=[0, 1]), ValueError, "axes="
    ),
    _case(
        "group-axis-out-of-range",
        lambda: keras_mat.ModuleGroup("g", [_kernel()], axes=2),
        ValueError,
        "axis=2",
    ),
    _case(
        "group-axis-float",
        lambda: keras_mat.ModuleGroup("g", [_kernel()], axes=[1.0]),
        ValueError,
        "axis=1.0",
    ),
    _case(
        "group-num_modules-nan",
        lambda: keras_mat.ModuleGroup("g", [_kernel()], 1, num_modules=NAN),
        ValueError,
        "num_modules=nan",
    ),
    _case(
        "group-num_modules-inf",
        lambda: keras_mat.ModuleGroup("g", [_kernel()], 1, num_modules=INF),
        ValueError,
        "num_modules=inf",
    ),
    _case(
        "group-num_modules-neg",
        lambda: keras_mat.ModuleGroup("g", [_kernel()], 1, num_modules=-1),
        ValueError,
        "num_modules=-1",
    ),
    _case(
        "group-num_modules-not-dividing",
        lambda: keras_mat.ModuleGroup("g", [_kernel()], 1, num_modules=3),
        ValueError,
        "num_modules=3",
    ),
    _case(
        "group-axis-None-many-modules",
        lambda: keras_mat.ModuleGroup("g", [_kernel()], None, num_modules=5),
        ValueError,
        "num_modules=5",
    ),
    _case(
        "group-kind",
        lambda: keras_mat.ModuleGroup("g", [_kernel()], 1, 5, kind=None),
        ValueError,
        "kind=None",
    ),
    # ---- RandomModules / Multirate / PaperRand ---------------------------------------
    _case("rand-fractions-nan", lambda: RandomModules(NAN, every=2), ValueError, "fractions"),
    _case("rand-fractions-inf", lambda: RandomModules(INF, every=2), ValueError, "fractions"),
    _case("rand-fractions-str", lambda: RandomModules("0.5", every=2), ValueError, "fractions"),
    _case("rand-fractions-list-nan", lambda: RandomModules([0.5, NAN], every=2), ValueError, "fractions"),
    _case("rand-fractions-dict-nan", lambda: RandomModules({"a": NAN}, every=2), ValueError, "fractions"),
    _case("rand-fractions-2d", lambda: RandomModules(np.full((2, 2), 0.5), every=2), ValueError, "fractions"),
    _case("rand-every-nan", lambda: RandomModules(0.5, every=NAN), ValueError, "every=nan"),
    _case("rand-every-float", lambda: RandomModules(0.5, every=1.5), ValueError, "every=1.5"),
    _case("rand-seed-None", lambda: RandomModules(0.5, every=2, seed=None), ValueError, "seed=None"),
    _case(
        "rand-masks-step-nan",
        lambda: RandomModules(0.5, every=2).masks(NAN, [("a", 2)]),
        ValueError,
        "step=nan",
    ),
    _case(
        "rand-masks-step-str",
        lambda: RandomModules(0.5, every=2).masks("3", [("a", 2)]),
        ValueError,
        "step='3'",
    ),
    _case(
        "rand-masks-families-str",
        lambda: RandomModules(0.5, every=2).masks(0, "ab"),
        TypeError,
        "families='ab'",
    ),
    _case(
        "rand-masks-families-nan",
        lambda: RandomModules(0.5, every=2).masks(0, [("a", NAN)]),
        ValueError,
        "families entry",
    ),
    _case("multirate-fast-nan", lambda: Multirate(fast_fraction=NAN), ValueError, "fast_fraction=nan"),
    _case("multirate-fast-str", lambda: Multirate(fast_fraction="0.5"), ValueError, "fast_fraction='0.5'"),
    _case("multirate-k-nan", lambda: Multirate(k=NAN), ValueError, "k=nan"),
    _case("multirate-k-float", lambda: Multirate(k=1.5), ValueError, "k=1.5"),
    _case("multirate-seed-None", lambda: Multirate(seed=None), ValueError, "seed=None"),
    _case("multirate-scale-nan", lambda: Multirate(slow_lr_scale=NAN), ValueError, "slow_lr_scale=nan"),
    _case("multirate-scale-inf", lambda: Multirate(slow_lr_scale=INF), ValueError, "slow_lr_scale=inf"),
    _case("multirate-scale-zero", lambda: Multirate(slow_lr_scale=0.0), ValueError, "slow_lr_scale=0.0"),
    _case("multirate-masks-families", lambda: Multirate().masks(0, [("a",)]), ValueError, "families entry"),
    _case("paper-rand-nan", lambda: PaperRand(NAN), ValueError, "fraction=nan"),
    _case("paper-rand-list", lambda: PaperRand([0.5]), ValueError, "fraction="),
    _case("paper-rand-every", lambda: PaperRand(0.5, every=0), ValueError, "every=0"),
    # ---- wrap / ModularAdaptiveOptimizer --------------------------------------------
    _case("wrap-optimizer-int", lambda: keras_mat.wrap(3), TypeError, "optimizer=3"),
    _case("wrap-optimizer-None", lambda: keras_mat.wrap(None), TypeError, "optimizer=None"),
    _case("wrap-optimizer-unknown", lambda: keras_mat.wrap("nosuchopt"), ValueError, "optimizer='nosuchopt'"),
    _case("wrap-optimizer-built", lambda: keras_mat.wrap(_built_sgd()), ValueError, "inner_optimizer="),
    _case(
        "wrap-optimizer-wrapped",
        lambda: keras_mat.wrap(keras_mat.wrap(_sgd())),
        ValueError,
        "inner_optimizer=",
    ),
    _case("wrap-alpha-nan", lambda: keras_mat.wrap(_sgd(), alpha=NAN), ValueError, "alpha=nan"),
    _case("wrap-alpha-one", lambda: keras_mat.wrap(_sgd(), alpha=1.0), ValueError, "alpha=1.0"),
    _case("wrap-alpha-str", lambda: keras_mat.wrap(_sgd(), alpha="0.5"), ValueError, "alpha='0.5'"),
    _case("wrap-alpha-array", lambda: keras_mat.wrap(_sgd(), alpha=np.array([0.5])), ValueError, "alpha="),
    _case("wrap-beta-zero", lambda: keras_mat.wrap(_sgd(), beta=0.0), ValueError, "beta=0.0"),
    _case("wrap-beta-nan", lambda: keras_mat.wrap(_sgd(), beta=NAN), ValueError, "beta=nan"),
    _case("wrap-beta-inf", lambda: keras_mat.wrap(_sgd(), beta=INF), ValueError, "beta=inf"),
    _case(
        "wrap-probe_every-zero", lambda: keras_mat.wrap(_sgd(), probe_every=0), ValueError, "probe_every=0"
    ),
    _case(
        "wrap-probe_every-nan", lambda: keras_mat.wrap(_sgd(), probe_every=NAN), ValueError, "probe_every=nan"
    ),
    _case(
        "wrap-probe_every-float",
        lambda: keras_mat.wrap(_sgd(), probe_every=1.5),
        ValueError,
        "probe_every=1.5",
    ),
    _case(
        "wrap-probe_samples-zero",
        lambda: keras_mat.wrap(_sgd(), probe_samples=0),
        ValueError,
        "probe_samples=0",
    ),
    _case("wrap-warmup-neg", lambda: keras_mat.wrap(_sgd(), warmup=-1), ValueError, "warmup=-1"),
    _case("wrap-warmup-nan", lambda: keras_mat.wrap(_sgd(), warmup=NAN), ValueError, "warmup=nan"),
    _case(
        "wrap-ntk_output-array",
        lambda: keras_mat.wrap(_sgd(), ntk_output=np.array(["sum"])),
        ValueError,
        "ntk_output=",
    ),
    _case(
        "wrap-ntk_output-None", lambda: keras_mat.wrap(_sgd(), ntk_output=None), ValueError, "ntk_output=None"
    ),
    _case(
        "wrap-threshold_scope-list",
        lambda: keras_mat.wrap(_sgd(), threshold_scope=["global"]),
        ValueError,
        "threshold_scope=",
    ),
    _case("wrap-policy-array", lambda: keras_mat.wrap(_sgd(), policy=np.zeros(3)), ValueError, "policy="),
    _case("wrap-policy-str", lambda: keras_mat.wrap(_sgd(), policy="rand"), ValueError, "policy='rand'"),
    _case(
        "wrap-skip-str",
        lambda: keras_mat.wrap(_sgd(), skip_gradients="yes"),
        ValueError,
        "skip_gradients='yes'",
    ),
    _case("wrap-name-int", lambda: keras_mat.wrap(_sgd(), name=3), ValueError, "name=3"),
    _case(
        "optimizer-inner-str",
        lambda: keras_mat.ModularAdaptiveOptimizer("sgd"),
        TypeError,
        "inner_optimizer='sgd'",
    ),
    _case(
        "optimizer-unknown-kwarg",
        lambda: keras_mat.ModularAdaptiveOptimizer(_sgd(), foo=1),
        ValueError,
        "foo",
    ),
    _case(
        "optimizer-learning_rate",
        lambda: keras_mat.ModularAdaptiveOptimizer(_sgd(), learning_rate=0.1),
        ValueError,
        "learning_rate=0.1",
    ),
    # ---- module_lambda_max ----------------------------------------------------------
    _case(
        "lambda-model-int",
        lambda: keras_mat.module_lambda_max(3, _x()),
        TypeError,
        "model=3",
    ),
    _case("lambda-x-None", lambda: _lam(x=None), ValueError, "`x`"),
    _case("lambda-x-str", lambda: _lam(x="abc"), ValueError, "`x`"),
    _case(
        "lambda-x-shape",
        lambda: _lam(x=np.zeros((4, 3, 8), "float32")),
        ValueError,
        r"x of shape \(4, 3, 8\)",
    ),
    _case("lambda-x-rank", lambda: _lam(x=np.zeros((4, 8), "float32")), ValueError, r"x of shape \(4, 8\)"),
    _case("lambda-x-empty", lambda: _lam(x=np.zeros((0, 4, 8), "float32")), ValueError, "batch size 0"),
    # Documented: a non-finite lambda_max raises a ValueError naming it.
    _case("lambda-x-nan", lambda: _lam(x=np.full((4, 4, 8), NAN, "float32")), ValueError, "lambda_max="),
    _case("lambda-x-inf", lambda: _lam(x=np.full((4, 4, 8), INF, "float32")), ValueError, "lambda_max="),
    _case(
        "lambda-lanczos-x-nan",
        lambda: _lam(x=np.full((4, 4, 8), NAN, "float32"), method="lanczos"),
        ValueError,
        "lambda_max",
    ),
    _case("lambda-ntk_output-str", lambda: _lam(ntk_output="foo"), ValueError, "ntk_output='foo'"),
    _case(
        "lambda-ntk_output-array",
        lambda: _lam(ntk_output=np.array(["sum"])),
        ValueError,
        "ntk_output=",
    ),
    _case("lambda-method", lambda: _lam(method="power"), ValueError, "method='power'"),
    _case(
        "lambda-max_probe_bytes-str", lambda: _lam(max_probe_bytes="1GB"), ValueError, "max_probe_bytes='1GB'"
    ),
    _case("lambda-max_probe_bytes-nan", lambda: _lam(max_probe_bytes=NAN), ValueError, "max_probe_bytes=nan"),
    _case("lambda-max_probe_bytes-zero", lambda: _lam(max_probe_bytes=0), ValueError, "max_probe_bytes=0"),
    _case(
        "lambda-lanczos_steps-zero",
        lambda: _lam(method="lanczos", lanczos_steps=0),
        ValueError,
        "lanczos_steps=0",
    ),
    _case(
        "lambda-lanczos_steps-str",
        lambda: _lam(method="lanczos", lanczos_steps="5"),
        ValueError,
        "lanczos_steps='5'",
    ),
    _case(
        "lambda-groups-int",
        lambda: _lam(groups=3),
        (ValueError, TypeError),
        "groups=3",
    ),
    _case("lambda-groups-entry", lambda: _lam(groups=[3]), ValueError, "groups entry=3"),
    _case(
        "lambda-groups-foreign",
        lambda: _lam(groups=[keras_mat.ModuleGroup("f", [_kernel()], 1, 5)]),
        ValueError,
        "not a variable of model",
    ),
    _case("lambda-loss-without-y", lambda: _lam(ntk_output="loss"), ValueError, "y=None"),
    _case(
        "lambda-y-batch",
        lambda: _lam(ntk_output="loss", y=np.zeros((3, 3), "float32"), loss=keras.losses.MeanSquaredError()),
        ValueError,
        r"`y`|y of shape|y=",
    ),
    _case(
        "lambda-loss-int", lambda: _lam(ntk_output="loss", y=np.zeros((4, 3)), loss=3), ValueError, "loss=3"
    ),
    # ---- policy (pure functions) ----------------------------------------------------
    _case("policy-alpha-nan", lambda: policy.check_alpha(NAN), ValueError, "alpha=nan"),
    _case("policy-alpha-array", lambda: policy.check_alpha(np.array([0.5])), ValueError, "alpha="),
    _case("policy-beta-inf", lambda: policy.check_beta(INF), ValueError, "beta=inf"),
    _case("policy-beta-str", lambda: policy.check_beta("1"), ValueError, "beta='1'"),
    _case("policy-warmup-float", lambda: policy.check_warmup(1.5), ValueError, "warmup=1.5"),
    _case("policy-warmup-nan", lambda: policy.check_warmup(NAN), ValueError, "warmup=nan"),
    _case("policy-scope", lambda: policy.scope_ids(["head"], "foo"), ValueError, "threshold_scope='foo'"),
    _case("policy-scope-kinds", lambda: policy.scope_ids(["neuron"]), ValueError, "kinds="),
    _case("policy-scope-kinds-str", lambda: policy.scope_ids("head"), ValueError, "kinds="),
    _case(
        "policy-initial_state-int",
        lambda: policy.initial_state(3),
        (ValueError, TypeError),
        "num_modules=3",
    ),
    _case(
        "policy-initial_state-negative",
        lambda: policy.initial_state([-1]),
        ValueError,
        "num_modules=",
    ),
    _case(
        "policy-initial_state-nan",
        lambda: policy.initial_state([NAN]),
        ValueError,
        "num_modules=",
    ),
    _case(
        "policy-expand-axis",
        lambda: policy.expand_mask(np.ones(2, "float32"), (4, 6), 2),
        ValueError,
        "axis=2",
    ),
    _case(
        "policy-expand-not-dividing",
        lambda: policy.expand_mask(np.ones(4, "float32"), (4, 6), 1),
        ValueError,
        r"mask\.shape=\(4,\)",
    ),
    _case(
        "policy-update-lengths",
        lambda: policy.policy_update(
            [np.ones(2, "float32")], policy.initial_state([2, 3]), 0.5, 1e-3, [0, 0]
        ),
        ValueError,
        "len",
    ),
    _case(
        "policy-update-alpha",
        lambda: policy.policy_update([np.ones(2, "float32")], policy.initial_state([2]), 2.0, 1e-3, [0]),
        ValueError,
        "alpha=2.0",
    ),
    _case(
        "policy-modular-shapes",
        lambda: policy.modular_masks([np.ones(3, "float32")], [np.zeros(2, "float32")], 0.5, [0]),
        ValueError,
        "frozen",
    ),
    # ---- plot_lambda ----------------------------------------------------------------
    _case("plot-source-int", lambda: keras_mat.plot_lambda(42), TypeError, "source"),
    _case("plot-no-rows", lambda: keras_mat.plot_lambda([]), ValueError, "0 rows"),
    _case(
        "plot-missing-file",
        lambda: keras_mat.plot_lambda("/nonexistent/mat.csv"),
        FileNotFoundError,
        "mat.csv",
    ),
    _case(
        "plot-row-missing-column",
        lambda: keras_mat.plot_lambda([{"step": 0}]),
        ValueError,
        "family",
    ),
    _case(
        "plot-lambda-str",
        lambda: keras_mat.plot_lambda(_rows("x")),
        ValueError,
        "lambda_max",
    ),
    _case(
        "plot-path-int",
        lambda: keras_mat.plot_lambda(_rows(), path=3),
        (ValueError, TypeError),
        "path=3",
    ),
    # ---- MATCallback ----------------------------------------------------------------
    _case("callback-x-None", lambda: keras_mat.MATCallback(None), ValueError, "x=None"),
    _case(
        "callback-probe_every",
        lambda: keras_mat.MATCallback(_x(), probe_every=0),
        ValueError,
        "probe_every=0",
    ),
    _case(
        "callback-probe_samples-nan",
        lambda: keras_mat.MATCallback(_x(), probe_samples=NAN),
        ValueError,
        "probe_samples=nan",
    ),
    _case(
        "callback-csv_path-int",
        lambda: keras_mat.MATCallback(_x(), csv_path=3),
        (ValueError, TypeError),
        "csv_path=3",
    ),
    _case(
        "callback-recompile-array",
        lambda: keras_mat.MATCallback(_x(), recompile=np.array(["auto"])),
        ValueError,
        "recompile=",
    ),
]


@pytest.mark.parametrize("call, errors, match", RAISES)
def test_bad_input_raises_a_clear_error(call, errors, match):
    with pytest.raises(errors, match=match) as info:
        call()
    # A clear error is raised for the user: not a wrapped one from deep inside.
    assert "Traceback" not in str(info.value)


def _returns_tuple_names(model):
    return tuple(g.name for g in keras_mat.get_groups(model))


def test_exclude_one_string_is_one_pattern():
    m = models.mlp()
    assert _returns_tuple_names(keras_mat.annotate(m, exclude="fc1", dense=True)) == ("fc0",)
    assert _returns_tuple_names(keras_mat.annotate(m, exclude=["fc1"], dense=True)) == ("fc0",)
    # Every character of "fc1" as a pattern would have left nothing.
    assert _returns_tuple_names(keras_mat.annotate(m, exclude="1", dense=True)) == ("fc0",)


def test_numpy_scalars_are_accepted_as_python_numbers():
    k = _kernel()
    g = keras_mat.ModuleGroup("g", [k], axes=np.int64(1), num_modules=np.int64(5))
    assert (g.axes, g.num_modules) == ([1], 5)
    g = keras_mat.ModuleGroup("g", [k], axes=[np.int32(-1)], num_modules=np.uint8(5))
    assert g.axes == [1] and type(g.num_modules) is int
    opt = keras_mat.wrap(
        _sgd(),
        alpha=np.float32(0.25),
        beta=np.float64(1e-3),
        probe_every=np.int64(5),
        probe_samples=np.int32(4),
        warmup=np.int64(0),
    )
    assert (opt.alpha, opt.probe_every, opt.probe_samples, opt.warmup) == (0.25, 5, 4, 0)
    assert all(type(v) in (int, float) for v in (opt.alpha, opt.beta, opt.probe_every, opt.warmup))
    assert RandomModules(np.float32(0.5), every=np.int64(2), seed=np.int64(1)).every == 2
    assert Multirate(np.float64(0.5), k=np.int16(2)).k == 2
    assert policy.check_alpha(np.float32(0.5)) == 0.5 and policy.check_warmup(np.int64(2)) == 2
    assert len(RandomModules(0.5, every=2).masks(np.int64(3), [("a", np.int64(4))])[0]) == 4


def test_callback_accepts_numpy_ints():
    cb = keras_mat.MATCallback(_x(), max_cached_steps=np.int64(2), batch_size=np.int64(8))
    assert (cb.max_cached_steps, cb.batch_size) == (2, 8)


def test_non_finite_lambda_max_is_a_policy_no_op():
    # Documented: a non-finite measurement leaves the state as it was.
    state = policy.initial_state([2, 3])
    lam = [np.array([NAN, 1.0], "float32"), np.array([1.0, INF, 2.0], "float32")]
    new = policy.policy_update(lam, state, 0.5, 1e-3, [0, 0])
    for before, after in zip(state.masks + state.frozen, new.masks + new.frozen):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(before), keras.ops.convert_to_numpy(after))
    assert int(keras.ops.convert_to_numpy(new.measurement)) == 0
    assert not bool(keras.ops.convert_to_numpy(policy.all_finite(lam)))


@pytest.mark.parametrize("value", [NAN, INF, 0.0, -1.0])
def test_plot_lambda_draws_any_float(value):
    # Documented: lambda_max = 0 is drawn outside the colour scale; NaN, inf
    # and negative values (a corrupted log) still give a figure.
    fig = keras_mat.plot_lambda(_rows(value) + [dict(_rows(2.0)[0], module=1)])
    assert type(fig).__name__ == "Figure"


def test_plot_lambda_truncated_csv_names_its_line(tmp_path):
    with pytest.raises(ValueError, match="line"):
        keras_mat.plot_lambda(str(_truncated_csv(tmp_path)))


def test_schedule_masks_are_finite_float32():
    # A schedule's masks never hold NaN: every draw is 0 or 1 (or the slow scale).
    for schedule in (RandomModules([0.0, 0.5, 1.0], every=1), PaperRand(0.5), Multirate(0.5, k=2)):
        for step in range(4):
            for m in schedule.masks(step, [("a", 4), ("b", 1)]):
                assert np.all(np.isfinite(m)) and m.dtype == np.float32
    assert math.isfinite(Multirate(0.5, k=3).scale)
