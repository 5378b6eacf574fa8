"""Training machinery: fit/train_step, reproducibility, checkpoints and resumption,
early stopping, data-parallel sharding, memory prediction, and bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import assimilation as da
import assimilation.learn as al
import dphys
import pdes
from dphys.testing import tree_allclose


ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------- helpers


class Affine(eqx.Module):
    """y = x . w + b."""

    w: jax.Array
    b: jax.Array

    def __call__(self, x):
        return jnp.dot(x, self.w) + self.b


def _regression(n=48, d=3, noise=0.1, seed=0):
    k1, k2 = jr.split(jr.key(seed))
    x = jr.normal(k1, (n, d))
    y = x @ jnp.array([1.5, -2.0, 0.5]) + 0.3 + noise * jr.normal(k2, (n,))
    return {"x": x, "y": y}


def _sq_loss(model, ex, key):
    return (model(ex["x"]) - ex["y"]) ** 2


def _noisy_loss(model, ex, key):
    # Uses its key, so that reproducibility covers the per-example keys too.
    jitter = 0.1 * jr.normal(key, ())
    r = model(ex["x"]) - ex["y"] + jitter
    return r**2, {"abs_residual": jnp.abs(r)}


def _affine(d=3):
    return Affine(jnp.zeros(d), jnp.zeros(()))


def _leaves_equal(a, b) -> bool:
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


# ------------------------------------------------------------------- optimum, API


def test_fit_reaches_the_least_squares_optimum():
    """Full-batch gradient descent with step 1/L converges linearly to the normal
    equations' solution, which fit must reach to round-off."""
    data = _regression()
    x1 = np.hstack([np.asarray(data["x"]), np.ones((48, 1))])
    coef, *_ = np.linalg.lstsq(x1, np.asarray(data["y"]), rcond=None)
    hess = 2 * x1.T @ x1 / 48
    lr = 1.0 / np.linalg.eigvalsh(hess).max()
    res = al.fit(
        _affine(),
        _sq_loss,
        data,
        optimizer=optax.sgd(lr),
        key=jr.key(0),
        batch_size=48,
        n_steps=400,
    )
    got = np.append(np.asarray(res.model.w), float(res.model.b))
    np.testing.assert_allclose(got, coef, rtol=1e-10, atol=1e-12)
    assert res.result == "completed" and res.stats["steps"] == 400
    # the monitored loss (no validation: the epoch's training loss) is the minimum
    assert res.stats["best_loss"] == pytest.approx(
        np.mean((x1 @ coef - np.asarray(data["y"])) ** 2), rel=1e-10
    )


def test_minibatch_sgd_reaches_the_interpolating_solution():
    """Without noise every example is fitted exactly at the optimum, so mini-batch
    SGD converges to it too (shuffled batches of 8)."""
    data = _regression(noise=0.0)
    res = al.fit(
        _affine(),
        _sq_loss,
        data,
        optimizer=optax.sgd(0.05),
        key=jr.key(3),
        batch_size=8,
        n_epochs=150,
    )
    np.testing.assert_allclose(res.best_model.w, [1.5, -2.0, 0.5], atol=1e-8)
    np.testing.assert_allclose(res.best_model.b, 0.3, atol=1e-8)


def test_train_step_is_pure_and_matches_a_batch_loss():
    data = _regression(n=8)
    opt = optax.adam(1e-2)
    s0 = al.init_train(_affine(), opt, key=jr.key(0))
    a, ma = al.train_step(s0, data, loss_fn=_sq_loss, optimizer=opt)
    b, mb = al.train_step(s0, data, loss_fn=_sq_loss, optimizer=opt)
    assert _leaves_equal(a, b)  # no hidden state
    batch = lambda m, d, key: jnp.mean((jax.vmap(m)(d["x"]) - d["y"]) ** 2)
    c, mc = al.train_step(s0, data, loss_fn=batch, optimizer=opt, batch_loss=True)
    assert tree_allclose(a.params, c.params, rtol=1e-12, atol=1e-14)
    assert int(a.step) == 1 and float(ma["loss"]) == pytest.approx(float(mc["loss"]))
    assert float(ma["grad_norm"]) > 0


def test_aux_diagnostics_are_recorded():
    data = _regression()
    res = al.fit(
        _affine(),
        _noisy_loss,
        data,
        optimizer=optax.adam(0.05),
        key=jr.key(0),
        batch_size=16,
        n_epochs=3,
        val_data=data,
    )
    h = res.history
    assert len(h["train_abs_residual"]) == 3 and len(h["val_abs_residual"]) == 3
    assert h["epoch"] == [1, 2, 3] and h["step"] == [3, 6, 9]
    assert all(np.isfinite(h["val_loss"]))


def test_freeze_keeps_frozen_leaves():
    data = _regression()
    model = Affine(jnp.zeros(3), jnp.asarray(0.7))
    spec = al.freeze(model, lambda m: m.b)
    res = al.fit(
        model,
        _sq_loss,
        data,
        optimizer=optax.adam(0.05),
        key=jr.key(0),
        batch_size=16,
        n_epochs=2,
        trainable=spec,
    )
    assert float(res.model.b) == 0.7 and res.state.params.b is None
    assert not np.allclose(res.model.w, 0.0)


def test_n_steps_may_end_mid_epoch():
    res = al.fit(
        _affine(),
        _sq_loss,
        _regression(),
        optimizer=optax.sgd(0.01),
        key=jr.key(0),
        batch_size=16,
        n_steps=7,
    )
    assert res.stats["steps"] == 7 and res.history["step"] == [3, 6, 7]


# ---------------------------------------------------------------- reproducibility


def test_same_seed_gives_bitwise_identical_parameters():
    data = _regression()
    kw = dict(optimizer=optax.adam(0.05), batch_size=8, n_epochs=4)
    a = al.fit(_affine(), _noisy_loss, data, key=jr.key(11), **kw)
    b = al.fit(_affine(), _noisy_loss, data, key=jr.key(11), **kw)
    c = al.fit(_affine(), _noisy_loss, data, key=jr.key(12), **kw)
    assert _leaves_equal(a.model, b.model)
    assert a.history["train_loss"] == b.history["train_loss"]
    assert not np.array_equal(a.model.w, c.model.w)  # the seed matters


def test_legacy_and_typed_keys_agree():
    data = _regression()
    kw = dict(optimizer=optax.adam(0.05), batch_size=8, n_epochs=2)
    a = al.fit(_affine(), _noisy_loss, data, key=jr.key(5), **kw)
    b = al.fit(_affine(), _noisy_loss, data, key=jr.PRNGKey(5), **kw)
    assert _leaves_equal(a.model, b.model)


# ------------------------------------------------------------------- early stopping


class Scalar(eqx.Module):
    theta: jax.Array


def test_early_stopping_stops_and_keeps_the_best_parameters():
    """Training drives theta from 0 towards 1 while the validation loss is minimal
    at theta = 0.3: validation improves, then worsens; with patience 2 training
    stops two epochs after the best one, and best_model holds that epoch's theta."""
    data = {"y": jnp.ones(4)}
    train_loss = lambda m, ex, key: (m.theta - ex["y"]) ** 2
    val_loss = lambda m, ex, key: (m.theta - 0.3 * ex["y"]) ** 2
    thetas = {}

    def record(info):
        thetas[info["epoch"]] = float(info["model"].theta)

    res = al.fit(
        Scalar(jnp.asarray(0.0)),
        train_loss,
        data,
        val_data=data,
        val_loss_fn=val_loss,
        optimizer=optax.sgd(0.05),
        key=jr.key(0),
        batch_size=4,
        n_epochs=100,
        patience=2,
        callback=record,
    )
    val = res.history["val_loss"]
    best = int(np.argmin(val)) + 1
    assert res.result == "early_stopped"
    assert res.stats["best_epoch"] == best and 1 < best < len(val)
    assert len(val) == best + 2  # patience epochs after the best
    assert float(res.best_model.theta) == thetas[best]
    assert float(res.model.theta) > float(res.best_model.theta)  # restored, not last
    assert np.all(np.diff(val[:best]) < 0) and np.all(np.diff(val[best - 1 :]) > 0)


def test_callback_can_stop_training():
    res = al.fit(
        _affine(),
        _sq_loss,
        _regression(),
        optimizer=optax.sgd(0.01),
        key=jr.key(0),
        batch_size=16,
        n_epochs=10,
        callback=lambda info: info["epoch"] >= 2,
    )
    assert res.result == "stopped_by_callback" and res.stats["epochs"] == 2


def test_non_finite_loss_stops_and_keeps_the_last_finite_best():
    data = {"y": jnp.ones(4)}
    loss = lambda m, ex, key: (m.theta - ex["y"]) ** 4
    res = al.fit(
        Scalar(jnp.asarray(3.0)),
        loss,
        data,
        optimizer=optax.sgd(10.0),
        key=jr.key(0),
        batch_size=4,
        n_epochs=50,
    )
    assert res.result == "non_finite_loss"
    assert np.isfinite(float(res.best_model.theta))


def test_select_best_picks_the_right_candidate():
    """Candidates differ by a frozen offset; only b = 0.5 can fit y = 2x + 0.5."""
    x = jnp.linspace(-1.0, 1.0, 16)[:, None]
    data = {"x": x, "y": 2 * x[:, 0] + 0.5}
    models = {b: Affine(jnp.zeros(1), jnp.asarray(b)) for b in (0.0, 0.5, 1.0)}
    sel = al.select_best(
        models,
        _sq_loss,
        data,
        val_data=data,
        key=jr.key(0),
        optimizer=optax.adam(0.1),
        batch_size=8,
        n_epochs=60,
        trainable=lambda leaf: eqx.is_inexact_array(leaf) and leaf.ndim == 1,
    )
    assert sel.best == 0.5
    assert sel.val_loss[0.5] < 1e-6 < min(sel.val_loss[0.0], sel.val_loss[1.0])
    assert float(sel.best_model.b) == 0.5


def test_evaluate_does_not_depend_on_the_chunk_size():
    data = _regression(n=10)
    model = Affine(jnp.array([1.0, 0.0, 0.0]), jnp.asarray(0.1))
    per = jax.vmap(lambda x, y: (model(x) - y) ** 2)(data["x"], data["y"])
    for bs in (3, 7, 10):
        got = al.evaluate(model, _sq_loss, data, key=jr.key(0), batch_size=bs)
        assert got["loss"] == pytest.approx(float(jnp.mean(per)), rel=1e-13)


# ------------------------------------------------------------------ checkpoints


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path):
    """A callback raising after epoch 3 kills the run; fit(resume=True) continues
    from the epoch-3 checkpoint to bitwise the same parameters and history."""
    data = _regression()
    kw = dict(
        optimizer=optax.adam(0.05),
        key=jr.key(7),
        batch_size=8,
        n_epochs=6,
        val_data=data,
    )
    ref = al.fit(_affine(), _noisy_loss, data, **kw)

    def crash(info):
        if info["epoch"] == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        al.fit(
            _affine(), _noisy_loss, data, checkpoint_dir=tmp_path, callback=crash, **kw
        )
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["epoch"] == 3
    res = al.fit(_affine(), _noisy_loss, data, checkpoint_dir=tmp_path, **kw)
    assert res.stats["resumed_from_step"] == 3 * 6
    assert _leaves_equal(res.state, ref.state)
    assert res.history["train_loss"] == ref.history["train_loss"]
    assert res.history["val_loss"] == ref.history["val_loss"]
    # a finished run resumed again does nothing; asked for more epochs, it goes on
    again = al.fit(_affine(), _noisy_loss, data, checkpoint_dir=tmp_path, **kw)
    assert again.stats["train_s"] < 5 and _leaves_equal(again.state, ref.state)
    longer = al.fit(
        _affine(), _noisy_loss, data, checkpoint_dir=tmp_path, **{**kw, "n_epochs": 8}
    )
    ref8 = al.fit(_affine(), _noisy_loss, data, **{**kw, "n_epochs": 8})
    assert _leaves_equal(longer.state, ref8.state)


def test_checkpoint_ignores_leftovers_and_refuses_another_configuration(tmp_path):
    data = _regression()
    kw = dict(optimizer=optax.adam(0.05), key=jr.key(7), batch_size=8, n_epochs=2)
    al.fit(_affine(), _sq_loss, data, checkpoint_dir=tmp_path, **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint.json", "state-000000012.eqx"]
    # a torn temporary file and an orphan state file from a killed writer
    (tmp_path / ".state-000000018.eqx.abc.tmp").write_bytes(b"\x00garbage")
    (tmp_path / "state-000000018.eqx").write_bytes(b"\x00garbage")
    res = al.fit(_affine(), _sq_loss, data, checkpoint_dir=tmp_path, **kw)
    assert res.stats["resumed_from_step"] == 12
    with pytest.raises(ValueError, match="different configuration"):
        al.fit(
            _affine(),
            _sq_loss,
            data,
            checkpoint_dir=tmp_path,
            **{**kw, "batch_size": 4},
        )
    fresh = al.fit(
        _affine(),
        _sq_loss,
        data,
        checkpoint_dir=tmp_path,
        resume=False,
        **{**kw, "batch_size": 4},
    )
    assert fresh.stats["resumed_from_step"] is None


_KILL_SCRIPT = """
import sys, time
import jax
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import jax.random as jr, optax
import assimilation.learn as al
from test_train import _affine, _noisy_loss, _regression

def slow(info):
    time.sleep(0.4)  # leaves time to be killed mid-training

data = _regression()
al.fit(_affine(), _noisy_loss, data, optimizer=optax.adam(0.05), key=jr.key(7),
       batch_size=8, n_epochs=12, val_data=data, checkpoint_dir=sys.argv[1],
       callback=slow)
"""


def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], cwd=tmp_path)
    sidecar = ckpt / "checkpoint.json"
    deadline = time.monotonic() + 240
    epoch = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if sidecar.exists():
            epoch = json.loads(sidecar.read_text())["epoch"]
            if epoch >= 3:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill"
    killed_at = json.loads(sidecar.read_text())["epoch"]
    assert 3 <= killed_at < 12
    data = _regression()
    kw = dict(
        optimizer=optax.adam(0.05),
        key=jr.key(7),
        batch_size=8,
        n_epochs=12,
        val_data=data,
    )
    res = al.fit(_affine(), _noisy_loss, data, checkpoint_dir=ckpt, **kw)
    assert res.stats["resumed_from_step"] == killed_at * 6
    ref = al.fit(_affine(), _noisy_loss, data, **kw)
    assert _leaves_equal(res.state, ref.state)
    assert res.history["val_loss"] == ref.history["val_loss"]


# --------------------------------------------------------------------- sharding


_SHARD_SCRIPT = """
import sys
import jax
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {root!r})
import equinox as eqx, jax.numpy as jnp, jax.random as jr, numpy as np, optax
import assimilation.learn as al
from dphys.testing import tree_allclose

assert len(jax.devices()) == 2, jax.devices()
net = eqx.nn.MLP(3, 1, 8, 2, key=jr.key(0))
x = jr.normal(jr.key(1), (32, 3))
data = {{"x": x, "y": jnp.sin(x).sum(axis=1)}}
def loss(m, ex, key):
    return (m(ex["x"] + 0.01 * jr.normal(key, (3,)))[0] - ex["y"]) ** 2
kw = dict(optimizer=optax.adam(1e-2), key=jr.key(2), batch_size=8, n_epochs=5,
          val_data=data, eval_batch_size=6)
two = al.fit(net, loss, data, **kw)
one = al.fit(net, loss, data, devices=jax.devices()[:1], **kw)
assert two.stats["n_devices"] == 2 and one.stats["n_devices"] == 1
leaf = jax.tree_util.tree_leaves(eqx.filter(two.model, eqx.is_array))[0]
assert len(leaf.sharding.device_set) == 2  # replicated over both devices
host = lambda m: jax.device_get(eqx.filter(m, eqx.is_array))
assert tree_allclose(host(two.model), host(one.model), rtol=1e-10, atol=1e-12)
assert not tree_allclose(host(two.model), host(net), rtol=1e-3, atol=0)  # it trained
np.testing.assert_allclose(two.history["val_loss"], one.history["val_loss"],
                           rtol=1e-10)
ev2 = al.evaluate(two.model, loss, data, key=jr.key(3), batch_size=4)
ev1 = al.evaluate(two.model, loss, data, key=jr.key(3), batch_size=4,
                  devices=jax.devices()[:1])
assert abs(ev2["loss"] - ev1["loss"]) <= 1e-12 * abs(ev1["loss"])
print("OK", two.history["train_loss"][-1])
"""


def test_data_parallel_over_two_devices_equals_one_device(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(_SHARD_SCRIPT.format(root=str(ROOT)))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")


# ----------------------------------------------------------- gradients, memory


def test_check_gradients_passes_and_catches_a_wrong_gradient():
    data = _regression(n=8)
    res = al.fit(
        _affine(),
        _sq_loss,
        data,
        optimizer=optax.sgd(0.01),
        key=jr.key(0),
        batch_size=8,
        n_steps=1,
        check_gradients=True,
    )
    assert res.stats["gradient_check"]["passed"]
    assert res.stats["gradient_check"]["rate"] > 1.9

    @jax.custom_vjp
    def wrong_square(r):
        return r**2

    wrong_square.defvjp(lambda r: (r**2, r), lambda r, g: (3.0 * r * g,))  # not 2r
    bad = lambda m, ex, key: wrong_square(m(ex["x"]) - ex["y"])
    with pytest.raises(RuntimeError, match="Taylor test"):
        al.fit(
            _affine(),
            bad,
            data,
            optimizer=optax.sgd(0.01),
            key=jr.key(0),
            batch_size=8,
            n_steps=1,
            check_gradients=True,
        )


def test_check_gradients_in_float32_warns():
    data = jtu.tree_map(lambda a: a.astype(jnp.float32), _regression(n=8))
    model = jtu.tree_map(lambda a: a.astype(jnp.float32), _affine())
    with pytest.warns(UserWarning, match="float64"):
        res = al.fit(
            model,
            _sq_loss,
            data,
            optimizer=optax.sgd(0.01),
            key=jr.key(0),
            batch_size=8,
            n_steps=2,
            check_gradients=True,
        )
    assert res.model.w.dtype == jnp.float32 and res.stats["steps"] == 2


def test_predict_memory_counts_the_temporaries():
    n = 1000
    x = jax.ShapeDtypeStruct((n,), jnp.float64)
    f = lambda x: jnp.sum(jnp.sin(jnp.outer(x, x)), axis=0)
    parts = al.memory_breakdown(f, x)
    assert parts["argument"] == 8 * n and parts["output"] == 8 * n
    assert al.predict_memory(f, x) == parts["total"] >= 8 * n * 2
    small = al.predict_memory(lambda x: 2 * x, x)
    assert small < parts["total"]
    assert al.check_memory_budget(f, x, budget_bytes=10**9) == parts["total"]
    with pytest.raises(al.MemoryBudgetError, match="budget_bytes"):
        al.check_memory_budget(f, x, budget_bytes=1000, what="the outer product")


def test_fit_reports_step_memory_and_time():
    res = al.fit(
        _affine(),
        _sq_loss,
        _regression(),
        optimizer=optax.adam(0.01),
        key=jr.key(0),
        batch_size=8,
        n_epochs=1,
        report_memory=True,
    )
    assert res.stats["step_memory_bytes"] > 0
    assert res.stats["train_s"] > 0 and res.stats["compile_s"] > 0
    assert len(res.history["time_s"]) == 1


def test_progress_bar(capsys):
    al.fit(
        _affine(),
        _sq_loss,
        _regression(),
        optimizer=optax.adam(0.01),
        key=jr.key(0),
        batch_size=8,
        n_epochs=2,
        progress=True,
    )
    assert "fit" in capsys.readouterr().err


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(n_steps=5), ValueError, "exactly one of `n_epochs` and `n_steps`"),
        (dict(n_epochs=None), ValueError, "exactly one of"),
        (dict(batch_size=100), ValueError, "`batch_size` must lie in"),
        (dict(batch_size=2.5), TypeError, "`batch_size` must be a positive int"),
        (dict(patience=3), ValueError, "`patience`.*needs `val_data`"),
        (dict(val_loss_fn=_sq_loss), ValueError, "`val_loss_fn` was given without"),
        (dict(optimizer="adam"), TypeError, "`optimizer` must be an optax"),
        (dict(loss_fn=3), TypeError, "`loss_fn` must be callable"),
        (dict(key=None), TypeError, "`key` is required"),
        (dict(key=jnp.zeros(3)), ValueError, "`key` must be a PRNG key"),
        (dict(trainable=False), ValueError, "`trainable` selects no leaf"),
        (dict(checkpoint_every=0), ValueError, "`checkpoint_every`"),
        (
            dict(train_data={"x": jnp.zeros((4, 3)), "y": jnp.zeros(5)}),
            ValueError,
            "same leading",
        ),
        (
            dict(train_data={"x": jnp.zeros((4, 3)), "f": print}),
            TypeError,
            "leaves are arrays",
        ),
        (dict(val_data={"x": jnp.zeros((4, 3))}), ValueError, "same pytree structure"),
        (
            dict(loss_fn=lambda m, ex, k: m(ex["x"][None])),
            TypeError,
            "scalar per-example loss",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(change, error, match):
    kw = dict(
        model=_affine(),
        loss_fn=_sq_loss,
        train_data=_regression(n=16),
        optimizer=optax.sgd(0.1),
        key=jr.key(0),
        batch_size=4,
        n_epochs=1,
    )
    kw.update(change)
    model, loss, data = kw.pop("model"), kw.pop("loss_fn"), kw.pop("train_data")
    with pytest.raises(error, match=match):
        al.fit(model, loss, data, **kw)


def test_batch_not_divisible_by_devices_is_refused():
    d = jax.devices()[0]
    with pytest.raises(ValueError, match="not divisible by the 2 devices"):
        al.fit(
            _affine(),
            _sq_loss,
            _regression(n=16),
            optimizer=optax.sgd(0.1),
            key=jr.key(0),
            batch_size=3,
            n_epochs=1,
            devices=[d, d],
        )


def test_float32_training_works():
    data = jtu.tree_map(lambda a: a.astype(jnp.float32), _regression(noise=0.0))
    model = jtu.tree_map(lambda a: a.astype(jnp.float32), _affine())
    res = al.fit(
        model,
        _sq_loss,
        data,
        optimizer=optax.adam(0.05),
        key=jr.key(0),
        batch_size=16,
        n_epochs=100,
    )
    assert res.best_model.w.dtype == jnp.float32
    np.testing.assert_allclose(res.best_model.w, [1.5, -2.0, 0.5], atol=1e-3)


def test_memory_of_a_step_returning_a_function_operator():
    # A model holding a lineax FunctionLinearOperator (a learned sparse net over the
    # physics) carries a closure-converted jaxpr: no JAX type, no device memory.
    # The compiled memory counts only the array leaves of the result.
    a = jnp.arange(12.0).reshape(3, 4)
    op = al.physics_operator(lambda x: a @ x, jnp.zeros(4))
    net = al.ALISTA(op, 2, step=0.1, lam=0.1)
    x = jax.ShapeDtypeStruct((3,), jnp.float64)
    with_op = al.memory_breakdown(lambda net, y: (net, net(y)), net, x)
    arrays = al.memory_breakdown(
        lambda net, y: (eqx.filter(net, eqx.is_array), net(y)), net, x
    )
    assert with_op == arrays and with_op["output"] >= 8 * 4


def test_fit_reports_memory_of_a_learned_net_over_the_physics():
    n = 8
    grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
    obs_op = da.Interpolation(grid, np.random.default_rng(0).uniform(0, 1, (4, 2)))

    def forward(f):
        return dphys.simulate(
            pdes.Heat(grid, kappa=1e-2, source=f),
            dphys.CrankNicolson(),
            jnp.zeros((n, n)),
            dt=0.05,
            n_steps=4,
            saveat=dphys.SaveAt(t1=False, steps=(2, 4), fn=lambda t, u: obs_op(u)),
        ).ys

    op = al.physics_operator(forward, jnp.zeros((n, n)))
    net = al.ALISTA(op, 2, step=1.0, lam=0.01, nonnegative=True)
    xs = jnp.abs(jr.normal(jr.key(0), (4, n, n)))
    ys = jax.vmap(op.mv)(xs)
    res = al.fit_unrolled(
        net, (ys, xs), key=jr.key(1), n_steps=1, batch_size=2, report_memory=True
    )
    # At least the arguments: the batch (2 examples) and the learned scalars.
    assert res.stats["step_memory_bytes"] >= 8 * (2 * (n * n + 8) + 4)
