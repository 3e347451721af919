"""Slow, obviously-correct lambda_max reference (used by tests only).

No vectorization and nothing shared with the fast path's contraction: every
row of the full Jacobian (one per sample and output) is a plain gradient of
one scalar; each module's columns are selected with explicit numpy index
masks; Theta_l = J_l J_l^T is formed in float64 and handed to
`numpy.linalg.eigh`.
"""

import keras
import numpy as np
from keras import ops, tree

from keras_mat import backends
from keras_mat.ntk import _forward, _unique_variables, resolve_groups


def _rows_of_sample(out, yi, mode, loss):
    leaves = tree.flatten(out)
    if mode == "logits":
        return ops.concatenate([ops.reshape(o, (-1,)) for o in leaves])
    if mode == "sum":
        total = 0.0
        for o in leaves:
            o = o[0]
            if len(o.shape) >= 1:
                o = ops.sum(o, axis=-1)
            if len(o.shape) >= 1:
                o = ops.mean(o)
            total = total + o
        return ops.reshape(total, (1,))
    if mode == "loss":
        # One loss on every output (each with its own target), summed.
        targets = [yi] if len(leaves) == 1 else tree.flatten(yi)
        total = 0.0
        for target, o in zip(targets, leaves):
            total = total + ops.mean(loss(target, o))
        return ops.reshape(total, (1,))
    raise ValueError(f"Unknown ntk_output. Received: ntk_output={mode!r}")


def module_selector(shape, axis, num_modules, module):
    """Boolean mask over a variable's entries that belong to `module`."""
    sel = np.zeros(shape, dtype=bool)
    if axis is None:
        sel[...] = True
        return sel
    block = shape[axis] // num_modules
    index = [slice(None)] * len(shape)
    index[axis] = slice(module * block, (module + 1) * block)
    sel[tuple(index)] = True
    return sel


def full_jacobian(model, x, groups, ntk_output, y=None, loss=None):
    """Dense Jacobian rows of the scalarized outputs.

    Returns:
        `(J, variables)`: `J` maps each probed variable to a float64 array of
        shape `(rows, variable.size)`, rows ordered sample-major.
    """
    kernel = backends.get()
    if ntk_output == "loss":
        from keras_mat.ntk import _resolve_loss

        loss = _resolve_loss(model, loss)
    every = _unique_variables(model)
    index = {id(v): i for i, v in enumerate(every)}
    variables = [v for g in groups for v in g.variables]
    pos = [index[id(v)] for v in variables]
    current = [kernel.snapshot(v) for v in every]
    n = tree.flatten(x)[0].shape[0]
    rows = {id(v): [] for v in variables}
    for i in range(n):
        xi = tree.map_structure(lambda t, i=i: ops.convert_to_tensor(t[i : i + 1]), x)
        yi = None if y is None else tree.map_structure(lambda t, i=i: ops.convert_to_tensor(t[i : i + 1]), y)

        def outputs(vals, xi=xi, yi=yi):
            values = list(current)
            for p, val in zip(pos, vals):
                values[p] = val
            with keras.StatelessScope(state_mapping=list(zip(every, values))):
                out = _forward(model, xi)
            return _rows_of_sample(out, yi, ntk_output, loss)

        k = int(kernel.to_numpy(outputs([current[p] for p in pos])).shape[0])
        for j in range(k):
            grads = kernel.scalar_grad(lambda vals, j=j: outputs(vals)[j], [current[p] for p in pos])
            for v, g in zip(variables, grads):
                rows[id(v)].append(np.asarray(kernel.to_numpy(g), dtype=np.float64).reshape(-1))
    return {id(v): np.stack(rows[id(v)]) for v in variables}, variables


def reference_lambda_max(model, x, groups=None, ntk_output="logits", y=None, loss=None, return_grams=False):
    """lambda_max per module from the full Jacobian and a dense eigensolver.

    Returns:
        Dict family name -> float64 array `(num_modules,)`; with
        `return_grams=True` also family name -> `(G, rows, rows)` Grams.
    """
    groups = resolve_groups(model, groups)
    jac, _ = full_jacobian(model, x, groups, ntk_output, y=y, loss=loss)
    lams, grams = {}, {}
    for g in groups:
        lam, gr = [], []
        for m in range(g.num_modules):
            cols = [
                jac[id(v)][:, module_selector(tuple(v.shape), axis, g.num_modules, m).reshape(-1)]
                for v, axis in zip(g.variables, g.axes)
            ]
            j_l = np.concatenate(cols, axis=1)
            theta = j_l @ j_l.T
            gr.append(theta)
            lam.append(np.linalg.eigh(theta)[0][-1])
        lams[g.name] = np.asarray(lam)
        grams[g.name] = np.stack(gr)
    return (lams, grams) if return_grams else lams
