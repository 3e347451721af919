"""Switch-style MoE masked LM on WikiText-2: plain vs MAT vs "Rand" vs Multirate (modules = experts and heads).

    KERAS_BACKEND=jax python examples/moe_wikitext2.py --preset demo
    python examples/moe_wikitext2.py --batch-size 16 --epochs 4 --steps-per-epoch 20 \
        --val-samples 128 --probe-every 10 --probe-samples 8

A small pre-LayerNorm transformer encoder whose feed-forward blocks are
top-1 routed mixtures of experts (`SwitchFeedForward`, after Fedus et al.,
"Switch Transformers", 2021), trained from scratch with the **masked-LM**
objective on the same data, vocabulary and seeded masking as
`bert_wikitext2.py` (see `benchmarks/harness/wikitext.py`: the official
archive by default; with `--data-dir`, an offline copy, trained on the
WikiText-2 *test* split and validated on the valid split). Like it, it needs
keras-hub, TensorFlow and tensorflow-text on every backend
(`pip install "keras-mat[hub]"`).

`SwitchFeedForward` has an int `num_experts` attribute and stacks every
expert weight on axis 0, `(num_experts, ...)`, so `keras_mat.annotate(model)`
makes each expert one module (its slices of the two kernels and biases);
the router kernel (`router_kernel`, shape `(hidden, num_experts)`) is left
out of every module and always trained. The attention layers are
`keras.layers.MultiHeadAttention`, so every head is a module too; heads and
experts share MAT's global threshold scope (the default for both kinds).
`--modules experts` makes the experts the only modules (the Switch
modules of the MAT paper; the heads then always train), `--modules heads`
the heads only.

Routing, in `keras.ops` only (the same code on JAX, TensorFlow and PyTorch):
each sequence is one routing group; every token goes to the expert with the
largest router probability; each expert takes at most
`capacity = ceil(capacity_factor * seq / num_experts)` tokens of a sequence
(later tokens overflow, get a zero expert output and pass through the
residual); dispatch and combine are one-hot einsums, and the expert output
is scaled by the router probability, through which the router learns. The
Switch load-balancing loss `num_experts * sum_e(f_e * P_e)` (f: fraction of
tokens routed to e, P: mean router probability of e; padding excluded),
times `--aux-loss-weight`, is added with `add_loss`.

FLOPs (`keras_mat.flops`): the expert matmuls are counted as one expert per
token (`top_k = 1`); the capacity slack (`capacity_factor`) and the
dispatch/combine einsums are not counted, so the counts are a lower bound
for this implementation, equal for every variant.

Runs unchanged under KERAS_BACKEND=jax, tensorflow or torch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

# The comparison harness and the WikiText-2 pipeline live in benchmarks/harness.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "harness"))

import keras  # noqa: E402
import wikitext  # noqa: E402  (benchmarks/harness/wikitext.py)
from keras import ops  # noqa: E402

DEFAULTS = {**wikitext.DEFAULTS, **dict(layers=2, heads=4, hidden=128, experts=4, epochs=3, lr=1e-3)}
DEFAULTS["out_dir"] = "results/moe_wikitext2"
#: `--modules` choices: the module kinds passed to `keras_mat.discover_groups(include=...)`.
MODULES = {"heads,experts": ("head", "expert"), "experts": ("expert",), "heads": ("head",)}
PRESETS = {
    "demo": {
        **wikitext.DEMO,
        **dict(layers=1, heads=4, hidden=64, experts=4, lr=1e-3, out_dir="results/demo_moe"),
    }
}


@keras.saving.register_keras_serializable(package="keras_mat_examples")
class SwitchFeedForward(keras.layers.Layer):
    """Top-1 routed mixture of feed-forward experts with stacked weights.

    Args:
        num_experts: Number of experts (>= 2).
        intermediate_dim: Hidden width of each expert.
        capacity_factor: Each expert takes at most
            `ceil(capacity_factor * tokens_per_sequence / num_experts)` tokens
            of a sequence.
        aux_loss_weight: Weight of the Switch load-balancing loss (0: none).
        activation: Activation of the expert hidden layer.

    Call arguments:
        inputs: `(batch, sequence, hidden)` with a static sequence length.
        padding_mask: Optional `(batch, sequence)` mask; padded tokens are
            not routed and do not count in the load-balancing loss.
    """

    top_k = 1  # one expert per token; read by keras_mat.flops

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        capacity_factor=1.25,
        aux_loss_weight=0.01,
        activation="gelu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(f"`num_experts` must be an int >= 2. Received: num_experts={num_experts!r}")
        if not isinstance(intermediate_dim, int) or intermediate_dim < 1:
            raise ValueError(
                f"`intermediate_dim` must be a positive int. Received: intermediate_dim={intermediate_dim!r}"
            )
        if not capacity_factor > 0:
            raise ValueError(f"`capacity_factor` must be > 0. Received: capacity_factor={capacity_factor!r}")
        self.num_experts = num_experts
        self.intermediate_dim = intermediate_dim
        self.capacity_factor = float(capacity_factor)
        self.aux_loss_weight = float(aux_loss_weight)
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        hidden = input_shape[-1]
        e, f = self.num_experts, self.intermediate_dim
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.router_kernel = self.add_weight(name="router_kernel", shape=(hidden, e), initializer=init)
        self.expert_kernel_in = self.add_weight(
            name="expert_kernel_in", shape=(e, hidden, f), initializer=init
        )
        self.expert_bias_in = self.add_weight(name="expert_bias_in", shape=(e, f), initializer="zeros")
        self.expert_kernel_out = self.add_weight(
            name="expert_kernel_out", shape=(e, f, hidden), initializer=init
        )
        self.expert_bias_out = self.add_weight(name="expert_bias_out", shape=(e, hidden), initializer="zeros")

    def capacity(self, sequence_length):
        return max(1, math.ceil(self.capacity_factor * sequence_length / self.num_experts))

    def call(self, inputs, padding_mask=None):
        length = inputs.shape[1]
        if length is None:
            raise ValueError(
                f"{self.name}: the sequence length must be static (it sets the expert capacity). "
                f"Received: inputs.shape={inputs.shape}"
            )
        dtype = inputs.dtype
        probs = ops.softmax(ops.einsum("bsd,de->bse", inputs, self.router_kernel), axis=-1)
        experts = ops.arange(self.num_experts)
        # One-hots by comparison, not ops.one_hot (data-dependent under torch.func.vmap).
        routed = ops.cast(ops.equal(ops.expand_dims(ops.argmax(probs, axis=-1), -1), experts), dtype)
        gate = ops.sum(probs * routed, axis=-1)  # probability of the chosen expert
        tokens = ops.ones_like(gate) if padding_mask is None else ops.cast(padding_mask, dtype)
        routed = routed * ops.expand_dims(tokens, -1)
        capacity = self.capacity(length)
        position = (ops.cumsum(routed, axis=1) - 1.0) * routed  # place in the expert's queue
        slots = ops.cast(ops.equal(ops.expand_dims(position, -1), ops.arange(capacity, dtype=dtype)), dtype)
        dispatch = ops.expand_dims(routed, -1) * slots  # (batch, seq, experts, capacity)
        expert_in = ops.einsum("bsec,bsd->becd", dispatch, inputs)
        hidden = ops.einsum("becd,edf->becf", expert_in, self.expert_kernel_in)
        hidden = self.activation(hidden + self.expert_bias_in[None, :, None, :])
        expert_out = ops.einsum("becf,efd->becd", hidden, self.expert_kernel_out)
        expert_out = expert_out + self.expert_bias_out[None, :, None, :]
        combine = dispatch * gate[:, :, None, None]
        outputs = ops.einsum("bsec,becd->bsd", combine, expert_out)
        if self.aux_loss_weight:
            count = ops.maximum(ops.sum(tokens), 1.0)
            fraction = ops.sum(routed, axis=(0, 1)) / count
            mean_prob = ops.sum(probs * ops.expand_dims(tokens, -1), axis=(0, 1)) / count
            self.add_loss(self.aux_loss_weight * self.num_experts * ops.sum(fraction * mean_prob))
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            intermediate_dim=self.intermediate_dim,
            capacity_factor=self.capacity_factor,
            aux_loss_weight=self.aux_loss_weight,
            activation=keras.activations.serialize(self.activation),
        )
        return config


def build_moe(
    vocabulary_size,
    layers,
    heads,
    hidden,
    intermediate,
    experts,
    seq,
    dropout=0.1,
    capacity_factor=1.25,
    aux_loss_weight=0.01,
):
    """A pre-LayerNorm masked-LM encoder with Switch MoE feed-forward blocks.

    Inputs: `token_ids`, `padding_mask` `(batch, seq)` and `mask_positions`
    `(batch, slots)`; output: logits `(batch, slots, vocabulary_size)` over
    the masked positions (the MLM head is tied to the token embedding).
    """
    import keras_hub

    token_ids = keras.Input((seq,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((seq,), dtype="bool", name="padding_mask")
    mask_positions = keras.Input((None,), dtype="int32", name="mask_positions")
    init = keras.initializers.TruncatedNormal(stddev=0.02)
    embedding = keras_hub.layers.ReversibleEmbedding(
        vocabulary_size, hidden, embeddings_initializer=init, name="token_embedding"
    )
    x = embedding(token_ids)
    x = x + keras_hub.layers.PositionEmbedding(seq, initializer=init, name="position_embedding")(x)
    x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    attention_mask = ops.expand_dims(ops.cast(padding_mask, "int32"), 1)  # (batch, 1, seq)
    for i in range(layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_attention_norm")(x)
        h = keras.layers.MultiHeadAttention(
            heads, hidden // heads, dropout=dropout, kernel_initializer=init, name=f"block{i}_attention"
        )(h, h, attention_mask=attention_mask)
        x = x + keras.layers.Dropout(dropout, name=f"block{i}_attention_dropout")(h)
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_moe_norm")(x)
        h = SwitchFeedForward(experts, intermediate, capacity_factor, aux_loss_weight, name=f"block{i}_moe")(
            h, padding_mask=padding_mask
        )
        x = x + keras.layers.Dropout(dropout, name=f"block{i}_moe_dropout")(h)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras_hub.layers.MaskedLMHead(
        token_embedding=embedding, intermediate_activation="gelu", kernel_initializer=init, name="mlm_head"
    )(x, mask_positions=mask_positions)
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask, "mask_positions": mask_positions}
    return keras.Model(inputs, logits, name="switch_mlm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    wikitext.add_arguments(p, PRESETS)
    p.add_argument("--experts", type=int, default=None, help="experts per MoE layer")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--aux-loss-weight", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument(
        "--modules", choices=sorted(MODULES), default="heads,experts",
        help="which parts are MAT modules (the others always train); experts: the paper's Switch modules",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.module_kinds = MODULES[args.modules]
    args = wikitext.resolve(p, args, DEFAULTS, PRESETS)
    if args.experts < 2:
        p.error(f"--experts must be >= 2. Received: --experts={args.experts}")
    return args


def main(argv=None):
    """Runs the comparison; returns the `compare` results dict (variant -> record)."""
    args = parse_args(argv)

    def build_model(vocabulary_size):
        return build_moe(
            vocabulary_size,
            args.layers,
            args.heads,
            args.hidden,
            args.intermediate,
            args.experts,
            args.seq,
            args.dropout,
            args.capacity_factor,
            args.aux_loss_weight,
        )

    title = (
        f"Switch MoE {args.layers} layers x {args.experts} experts, {args.heads} heads, hidden {args.hidden}, "
        f"seq {args.seq}, WikiText-2 MLM"
    )
    run, _ = wikitext.prepare(args, build_model, title, drop_keys=("segment_ids",))
    return run(args.variants, args.out_dir) if args.variants else {}


if __name__ == "__main__":
    main()
