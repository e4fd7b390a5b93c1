"""Which backend runs the hot ops: the registry, the per-call choice and its precedence
(argument > use_backend > set_default_backend > DISTILBERT_FAST_BACKEND > auto), errors for
unknown or unusable backends, the reporting (last_backend, debug log), and the model's routing.

Fake backends, registered only for the tests that ask for the ``fakes`` fixture, delegate to the
eager backend and count their calls.
"""

import collections
import logging
import threading

import pytest
import torch

from conftest import SMALL_CONFIG
from distilbert_fast import DistilBertConfig, DistilBertModel, ops
from distilbert_fast.ops import backends

OP_NAMES = ("masked_attention", "bias_activation", "residual_layernorm")
# The base model's FFN runs linear_activation, not bias_activation; a backend without its own
# linear_activation runs it as its linear (torch's matmul by default) plus its bias_activation
# methods (Backend's default). The other projections run linear.
# model_inputs() has padding, so the model runs packed: its attention is varlen_attention.
MODEL_OP_NAMES = ("varlen_attention", "residual_layernorm", "linear_activation", "linear")
METHODS = tuple(f"{op}_{way}" for op in ("attention", "bias_activation", "residual_layernorm")
                for way in ("forward", "backward"))
MODEL_METHODS = tuple(f"{op}_{way}" for op in ("varlen_attention", "bias_activation", "residual_layernorm")
                      for way in ("forward", "backward"))


class CountingBackend(ops.Backend):
    """Runs every op on the eager backend, counting calls per method."""

    def __init__(self, name, priority, reject_cpu=False, reject_dtypes=()):
        self.name = name
        self.priority = priority
        self.reject_cpu = reject_cpu
        self.reject_dtypes = tuple(reject_dtypes)
        self.inner = backends._registry["eager"]
        self.calls = collections.Counter()

    def unsupported_reason(self, tensor):
        if self.reject_cpu and tensor.device.type == "cpu":
            return f"{self.name} runs on CUDA only"
        if tensor.dtype in self.reject_dtypes:
            return f"{self.name} does not support {tensor.dtype}"
        return None

    def _run(self, method, *args):
        self.calls[method] += 1
        return getattr(self.inner, method)(*args)

    def attention_forward(self, *args):
        return self._run("attention_forward", *args)

    def attention_backward(self, *args):
        return self._run("attention_backward", *args)

    def varlen_attention_forward(self, *args):
        return self._run("varlen_attention_forward", *args)

    def varlen_attention_backward(self, *args):
        return self._run("varlen_attention_backward", *args)

    def bias_activation_forward(self, *args):
        return self._run("bias_activation_forward", *args)

    def bias_activation_backward(self, *args):
        return self._run("bias_activation_backward", *args)

    def residual_layernorm_forward(self, *args):
        return self._run("residual_layernorm_forward", *args)

    def residual_layernorm_backward(self, *args):
        return self._run("residual_layernorm_backward", *args)


Fakes = collections.namedtuple("Fakes", "hi lo gpu")


@pytest.fixture
def fakes(monkeypatch):
    """fake_hi (priority 100, no float16), fake_lo (priority -10: never chosen by auto over
    eager) and fake_gpu (priority 1000, rejects CPU tensors). Removed from the registry, and
    last_backend / log state restored, after the test."""
    made = Fakes(
        hi=CountingBackend("fake_hi", 100, reject_dtypes=[torch.float16]),
        lo=CountingBackend("fake_lo", -10),
        gpu=CountingBackend("fake_gpu", 1000, reject_cpu=True),
    )
    # registered out of priority order, so the ordering below is the registry's doing
    for backend in (made.gpu, made.lo, made.hi):
        monkeypatch.setitem(backends._registry, backend.name, backend)
    monkeypatch.setattr(backends, "_last", {})  # starts empty: earlier tests' ops do not show
    monkeypatch.setattr(backends, "_logged", dict(backends._logged))
    yield made


def _x(dtype=torch.float32):
    return torch.randn(2, 3, 8, dtype=dtype)


def run_bias_activation(backend=None, dtype=torch.float32):
    """Runs one op; returns the name of the backend that ran it."""
    ops.bias_activation(_x(dtype), torch.randn(8, dtype=dtype), "relu", backend=backend)
    return ops.last_backend("bias_activation")


def run_all_ops(backend=None):
    """Runs each op forward and backward."""
    q, k, v = (t.requires_grad_(True) for t in torch.randn(3, 1, 2, 4, 8).unbind(0))
    out, _ = ops.masked_attention(q, k, v, backend=backend)
    x = torch.randn(1, 4, 8, requires_grad=True)
    y = ops.bias_activation(x, torch.randn(8), "gelu", backend=backend)
    z = ops.residual_layernorm(y, x, torch.ones(8), torch.zeros(8), backend=backend)
    (out.sum() + z.sum()).backward()


def tiny_model(**config):
    return DistilBertModel(DistilBertConfig(**{**SMALL_CONFIG, **config}))


def model_inputs():
    input_ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (2, 7))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 4:] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask)


# -- the registry --------------------------------------------------------------------------------
def test_eager_is_registered_and_available_on_cpu():
    assert "eager" in ops.registered_backends()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert "eager" in ops.available_backends(torch.zeros(1, dtype=dtype))
    assert "eager" in __import__("distilbert_fast").available_backends(torch.zeros(1))


def test_registry_order_and_availability(fakes):
    names = ops.registered_backends()
    assert names.index("fake_gpu") < names.index("fake_hi") < names.index("eager") < names.index("fake_lo")
    cpu = ops.available_backends(torch.zeros(1))
    assert "fake_gpu" not in cpu
    assert cpu.index("fake_hi") < cpu.index("eager") < cpu.index("fake_lo")
    assert "fake_hi" not in ops.available_backends(torch.zeros(1, dtype=torch.float16))


@pytest.mark.parametrize("name", ["auto", "?"])
def test_reserved_names_cannot_be_registered(name):
    backend = CountingBackend(name, 0)
    with pytest.raises(ValueError, match="reserved"):
        ops.register_backend(backend)
    assert name not in backends._registry


# -- auto ------------------------------------------------------------------------------------------
def test_auto_picks_the_highest_priority_backend_that_supports_the_tensor(fakes):
    assert run_bias_activation() == "fake_hi"  # fake_gpu is preferred but rejects CPU
    assert fakes.hi.calls["bias_activation_forward"] == 1
    assert fakes.gpu.calls["bias_activation_forward"] == 0
    assert ops.resolve_backend("masked_attention", torch.zeros(1)) is fakes.hi
    # fake_hi rejects float16: auto moves on to eager
    assert run_bias_activation(dtype=torch.float16) == "eager"
    assert fakes.hi.calls["bias_activation_forward"] == 1
    assert run_bias_activation(backend="auto") == "fake_hi"


def test_auto_with_no_supporting_backend_is_an_error(fakes, monkeypatch):
    monkeypatch.setattr(backends, "_registry", {"fake_gpu": fakes.gpu})
    with pytest.raises(RuntimeError, match="no backend supports bias_activation"):
        run_bias_activation()


def test_auto_without_fakes_runs_eager():
    # whatever else is registered, eager runs every CPU dtype, so auto finds something
    for op_name in OP_NAMES:
        assert ops.resolve_backend(op_name, torch.zeros(1)).name in ops.available_backends(torch.zeros(1))
    run_all_ops()
    assert set(ops.last_backend()) >= set(OP_NAMES)


# -- the choice and its precedence -----------------------------------------------------------------
def test_precedence_argument_use_backend_default_env_auto(fakes, monkeypatch):
    assert run_bias_activation() == "fake_hi"  # auto
    monkeypatch.setenv(ops.ENV_VAR, "fake_lo")
    assert run_bias_activation() == "fake_lo"  # env var > auto
    ops.set_default_backend("eager")
    assert ops.get_default_backend() == "eager"
    assert run_bias_activation() == "eager"  # set_default_backend > env var
    with ops.use_backend("fake_lo"):
        assert run_bias_activation() == "fake_lo"  # use_backend > set_default_backend
        assert run_bias_activation(backend="fake_hi") == "fake_hi"  # argument > use_backend
        assert run_bias_activation(backend="auto") == "fake_hi"  # 'auto' as an argument is a choice
        with ops.use_backend("eager"):  # nests
            assert run_bias_activation() == "eager"
        assert run_bias_activation() == "fake_lo"  # restored by the inner exit
    assert run_bias_activation() == "eager"  # restored by the outer exit
    ops.set_default_backend(None)
    assert ops.get_default_backend() is None
    assert run_bias_activation() == "fake_lo"  # back to the env var
    monkeypatch.delenv(ops.ENV_VAR)
    assert run_bias_activation() == "fake_hi"  # back to auto
    # each choice really ran there, not just got reported
    assert fakes.lo.calls["bias_activation_forward"] == 4
    assert fakes.hi.calls["bias_activation_forward"] == 4


def test_env_var_auto_means_auto(fakes, monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    assert run_bias_activation() == "fake_hi"
    monkeypatch.setenv(ops.ENV_VAR, "eager")
    assert run_bias_activation() == "eager"


def test_use_backend_restores_after_an_exception(fakes):
    with pytest.raises(KeyError):
        with ops.use_backend("fake_lo"):
            assert run_bias_activation() == "fake_lo"
            raise KeyError("boom")
    assert run_bias_activation() == "fake_hi"


def test_use_backend_is_per_thread(fakes):
    """The use_backend override is a context variable: another thread does not see it."""
    seen = []
    with ops.use_backend("fake_lo"):
        thread = threading.Thread(target=lambda: seen.append(ops.resolve_backend("bias_activation", _x()).name))
        thread.start()
        thread.join()
        assert run_bias_activation() == "fake_lo"
    assert seen == ["fake_hi"]


def test_backward_runs_on_the_backend_that_ran_forward(fakes):
    """The backend is fixed at forward time: a use_backend around backward() changes nothing."""
    x = _x().requires_grad_(True)
    with ops.use_backend("fake_lo"):
        y = ops.bias_activation(x, None, "silu")
    with ops.use_backend("fake_hi"):
        y.sum().backward()
    assert fakes.lo.calls["bias_activation_backward"] == 1
    assert fakes.hi.calls["bias_activation_backward"] == 0


@pytest.mark.parametrize("backend", ["fake_hi", "fake_lo"])
def test_all_ops_forward_and_backward_run_on_the_chosen_backend(fakes, backend):
    run_all_ops(backend=backend)
    chosen = getattr(fakes, backend.removeprefix("fake_"))
    assert {m: chosen.calls[m] for m in METHODS} == {m: 1 for m in METHODS}
    assert ops.last_backend() == {op: backend for op in OP_NAMES}
    for op_name in OP_NAMES:
        assert ops.last_backend(op_name) == backend
    others = [b for b in fakes if b is not chosen]
    assert all(sum(b.calls.values()) == 0 for b in others)


# -- errors ---------------------------------------------------------------------------------------
def _assert_lists_known_names(message, *names):
    assert "'nope'" in message
    for name in ("auto", "eager") + names:
        assert f"'{name}'" in message, f"{name!r} missing from: {message}"


UNKNOWN_NAME_WAYS = {
    "argument": lambda mp: run_bias_activation(backend="nope"),
    "env_var": lambda mp: (mp.setenv(ops.ENV_VAR, "nope"), run_bias_activation()),
    "set_default_backend": lambda mp: ops.set_default_backend("nope"),
    "use_backend": lambda mp: ops.use_backend("nope").__enter__(),
    "model.set_backend": lambda mp: tiny_model().set_backend("nope"),
    "config_at_construction": lambda mp: tiny_model(backend="nope"),
}


@pytest.mark.parametrize("way", list(UNKNOWN_NAME_WAYS))
def test_unknown_backend_names_raise_value_error_listing_known_ones(way, monkeypatch):
    with pytest.raises(ValueError) as info:
        UNKNOWN_NAME_WAYS[way](monkeypatch)
    _assert_lists_known_names(str(info.value))


@pytest.mark.parametrize("way", list(UNKNOWN_NAME_WAYS))
def test_unknown_backend_error_lists_registered_fakes(way, fakes, monkeypatch):
    with pytest.raises(ValueError) as info:
        UNKNOWN_NAME_WAYS[way](monkeypatch)
    _assert_lists_known_names(str(info.value), "fake_hi", "fake_lo", "fake_gpu")


def test_rejected_names_change_nothing(fakes):
    ops.set_default_backend("fake_lo")
    with pytest.raises(ValueError):
        ops.set_default_backend("nope")
    assert ops.get_default_backend() == "fake_lo"
    model = tiny_model().set_backend("eager")
    with pytest.raises(ValueError):
        model.set_backend("nope")
    assert model.backend == "eager"


BACKEND_ON_WRONG_DEVICE_WAYS = {
    "argument": lambda op, mp: op(backend="fake_gpu"),
    "use_backend": lambda op, mp: _within(ops.use_backend("fake_gpu"), op),
    "set_default_backend": lambda op, mp: (ops.set_default_backend("fake_gpu"), op()),
    "env_var": lambda op, mp: (mp.setenv(ops.ENV_VAR, "fake_gpu"), op()),
}


def _within(context, fn):
    with context:
        return fn()


def _op_calls():
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    return {
        "masked_attention": lambda backend=None: ops.masked_attention(q, k, v, backend=backend),
        "bias_activation": lambda backend=None: ops.bias_activation(_x(), None, backend=backend),
        "residual_layernorm": lambda backend=None: ops.residual_layernorm(
            _x(), None, torch.ones(8), torch.zeros(8), backend=backend),
    }


@pytest.mark.parametrize("way", list(BACKEND_ON_WRONG_DEVICE_WAYS))
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_named_backend_that_cannot_run_is_an_error_not_a_fallback(fakes, monkeypatch, way, op_name):
    ops.bias_activation(_x(), None, backend="fake_lo")  # something ran before
    before = dict(ops.last_backend())
    with pytest.raises(RuntimeError) as info:
        BACKEND_ON_WRONG_DEVICE_WAYS[way](_op_calls()[op_name], monkeypatch)
    message = str(info.value)
    assert "'fake_gpu'" in message and op_name in message and "runs on CUDA only" in message
    assert sum(fakes.gpu.calls.values()) == 0
    assert fakes.hi.calls[f"{op_name.replace('masked_', '')}_forward"] == 0  # not auto either
    assert ops.last_backend() == before  # nothing else ran in its place


def test_model_on_a_backend_that_cannot_run_is_an_error(fakes):
    model = tiny_model().set_backend("fake_gpu")
    with pytest.raises(RuntimeError, match="fake_gpu"):
        model(**model_inputs())
    assert sum(fakes.hi.calls.values()) == sum(fakes.lo.calls.values()) == 0


# -- reporting -------------------------------------------------------------------------------------
def test_last_backend_reports_per_op(fakes):
    ops.masked_attention(*torch.randn(3, 1, 1, 2, 4).unbind(0), backend="fake_lo")
    ops.bias_activation(_x(), None, backend="eager")
    ops.residual_layernorm(_x(), None, torch.ones(8), torch.zeros(8))  # auto
    assert ops.last_backend("masked_attention") == "fake_lo"
    assert ops.last_backend("bias_activation") == "eager"
    assert ops.last_backend("residual_layernorm") == "fake_hi"
    assert ops.last_backend() == {
        "masked_attention": "fake_lo", "bias_activation": "eager", "residual_layernorm": "fake_hi"}
    assert ops.last_backend("no_such_op") is None
    # a snapshot, not the live state
    snapshot = ops.last_backend()
    snapshot["bias_activation"] = "changed"
    assert ops.last_backend("bias_activation") == "eager"


def test_debug_log_says_which_backend_ran(fakes, caplog, monkeypatch):
    monkeypatch.setattr(backends, "_logged", {})
    caplog.set_level(logging.DEBUG, logger="distilbert_fast.ops")

    def records():
        return [r.getMessage() for r in caplog.records if r.name == "distilbert_fast.ops"]

    run_bias_activation(backend="eager")
    assert len(records()) == 1
    assert "bias_activation" in records()[0] and "'eager'" in records()[0] and "cpu" in records()[0]
    caplog.clear()
    run_bias_activation(backend="eager")  # unchanged: not logged again
    assert records() == []
    run_bias_activation()  # auto -> fake_hi: a change, logged
    assert len(records()) == 1 and "'fake_hi'" in records()[0]
    caplog.clear()
    run_all_ops(backend="fake_lo")
    messages = records()
    assert len(messages) == 3
    for op_name in OP_NAMES:
        assert any(op_name in m and "'fake_lo'" in m for m in messages), (op_name, messages)


# -- the model -------------------------------------------------------------------------------------
def _train_step(model, inputs=None):
    out = model(**(inputs or model_inputs())).last_hidden_state
    out.float().pow(2).mean().backward()
    return out.detach()


def _expected_model_calls(n_layers):
    # per layer: attention, FFN bias+activation, two residual LayerNorms; plus the embeddings' one
    per_op = {"varlen_attention": n_layers, "bias_activation": n_layers, "residual_layernorm": 2 * n_layers + 1}
    return {f"{op}_{way}": n for op, n in per_op.items() for way in ("forward", "backward")}


@pytest.mark.parametrize("how", ["set_backend", "config"])
def test_model_routes_every_op_through_the_chosen_backend(fakes, how):
    """fake_lo ranks below eager, so only the model's own choice can send the ops to it; it must
    see every op, forward and backward, in train mode (dropout on)."""
    model = tiny_model(backend="fake_lo") if how == "config" else tiny_model().set_backend("fake_lo")
    assert model.backend == "fake_lo"
    model.train()
    _train_step(model)
    assert {m: fakes.lo.calls[m] for m in MODEL_METHODS} == _expected_model_calls(SMALL_CONFIG["n_layers"])
    assert ops.last_backend() == {op: "fake_lo" for op in MODEL_OP_NAMES}
    assert sum(fakes.hi.calls.values()) == sum(fakes.gpu.calls.values()) == 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


def test_model_backend_choice_leaves_results_unchanged(fakes):
    """The fakes run eager's code: the same model gives identical outputs and gradients whichever
    of them it is routed through."""
    model = tiny_model().eval()
    inputs = model_inputs()
    results = []
    for name in ("eager", "fake_lo", "fake_hi"):
        model.zero_grad()
        model.set_backend(name)
        out = _train_step(model, inputs)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out, grads))
    assert ops.last_backend() == {op: "fake_hi" for op in MODEL_OP_NAMES}
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert len(grads) == len(results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def test_model_auto_defers_to_use_backend_and_default(fakes):
    """A model left on 'auto' passes no backend argument, so use_backend and the default apply;
    a model with a named backend ignores them."""
    model = tiny_model().eval()
    assert model.backend == "auto"
    model(**model_inputs())
    assert ops.last_backend() == {op: "fake_hi" for op in MODEL_OP_NAMES}
    with ops.use_backend("fake_lo"):
        model(**model_inputs())
    assert ops.last_backend() == {op: "fake_lo" for op in MODEL_OP_NAMES}
    ops.set_default_backend("eager")
    model(**model_inputs())
    assert ops.last_backend() == {op: "eager" for op in MODEL_OP_NAMES}
    model.set_backend("fake_lo")
    with ops.use_backend("fake_hi"):
        model(**model_inputs())
    assert ops.last_backend() == {op: "fake_lo" for op in MODEL_OP_NAMES}
    model.set_backend("auto")
    assert model.backend == "auto" and model.config.backend is None
    model.set_backend(None)
    assert model.backend == "auto"


def test_from_pretrained_backend_argument(fakes, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = DistilBertModel.from_pretrained(tmp_path, backend="fake_lo")
    assert model.backend == "fake_lo"
    model.eval()(**model_inputs())
    assert fakes.lo.calls["varlen_attention_forward"] == SMALL_CONFIG["n_layers"]
    with pytest.raises(ValueError, match="'nope'"):
        DistilBertModel.from_pretrained(tmp_path, backend="nope")


def test_no_fake_backend_outlives_its_test():
    """Runs after the tests above (file order): the fixture took its fakes out again."""
    assert not [n for n in ops.registered_backends() if n.startswith("fake_")]
    assert not [n for n in ops.last_backend().values() if n.startswith("fake_")]
