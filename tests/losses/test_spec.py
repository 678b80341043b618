"""Every registered loss has a LossSpec whose declared needs and abilities are true."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses import (
    LOSSES,
    LossSpec,
    SparseTeacher,
    chunked_distillation_loss,
    loss_spec,
    register_loss,
)
from kdforge.losses.signal import sample_tail
from kdforge.losses.spec import SET_BY_TRAINER

SPECS = [LOSSES.get(n) for n in LOSSES.names()]
IDS = [s.name for s in SPECS]
KD_SPECS = [s for s in SPECS if s.needs_teacher]
#: a non-default value of each loss's own parameter, so that "t" of TAID is not the forward-KL endpoint
NON_TRIVIAL = {"taid": {"t": 0.5}, "dac_kl": {"keep_label": False}}  # dac_kl: labels only widen its region
V = 9


def _inputs(seed: int = 0, n: int = 5, v: int = V, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=dtype).requires_grad_()
    t = torch.randn(n, v, generator=g, dtype=dtype) * 2
    y = torch.randint(0, v, (n,), generator=g)
    return s, t, y


def _grad(spec: LossSpec, s, teacher, **kw):
    s = s.detach().clone().requires_grad_()
    value = spec(s, teacher, reduction="sum", **kw)
    (g,) = torch.autograd.grad(value, s)
    return value.detach(), g


# --------------------------------------------------------------------------------- registry


def test_every_registered_loss_is_a_spec_that_calls_its_function_with_its_signature():
    s, t, y = _inputs()
    assert {"forward_kl", "reverse_kl", "generalized_jsd", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl",
            "adaptive_kl", "dkd", "taid", "cross_entropy"} <= set(LOSSES.names())
    for spec in SPECS:
        assert isinstance(spec, LossSpec) and spec.description and loss_spec(spec.name) is spec
        assert loss_spec(spec.fn) is spec and loss_spec(spec) is spec
        assert inspect.signature(spec) == inspect.signature(spec.fn)
        torch.testing.assert_close(spec(s, t, labels=y), spec.fn(s, t, labels=y))


def test_params_model_holds_the_keyword_only_parameters_the_trainer_does_not_set():
    for spec in SPECS:
        kw_only = {p.name for p in inspect.signature(spec.fn).parameters.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert set(spec.param_names) == kw_only - SET_BY_TRAINER, spec.name
        assert "temperature" in spec.param_names


def test_default_temperature_is_the_functions_own_default():
    own = {"dkd": 4.0, "similarity_kd": 0.05}  # the functions whose temperature default is not 1
    assert all(s.default_temperature == own.get(s.name, 1.0) for s in SPECS)


def test_unknown_name_raises_with_a_suggestion_and_an_unregistered_callable_gets_a_spec():
    with pytest.raises(ConfigError, match="did you mean 'forward_kl'"):
        loss_spec("forwrd_kl")

    def my_loss(student_logits, teacher, *, mask=None, temperature=3.0, reduction="mean", labels=None, gamma=1.0):
        return student_logits.sum()

    spec = loss_spec(my_loss)
    assert spec.name == "my_loss" and spec.param_names == ("gamma", "temperature")
    assert spec.default_temperature == 3.0 and spec.kernel is None and "my_loss" not in LOSSES


def test_register_loss_adds_a_spec_and_returns_the_plain_function(monkeypatch):
    monkeypatch.setattr(LOSSES, "_entries", dict(LOSSES._entries))  # restored after the test

    @register_loss("test_only_l2", paper="nobody", sparse_ok=False)
    def l2(student_logits, teacher, *, scale: float = 1.0, mask=None, temperature=1.0, reduction="mean",
           labels=None):
        """squared error between logits."""
        return scale * (student_logits - teacher).pow(2).sum()

    spec = LOSSES.get("test_only_l2")
    assert not isinstance(l2, LossSpec) and spec.fn is l2
    assert spec.description == "squared error between logits." and not spec.sparse_ok and spec.paper == "nobody"
    assert spec.validate_params({"scale": 2}) == {"scale": 2.0}


# --------------------------------------------------------------------------------- validate_params


def test_validate_params_names_the_unknown_parameter_the_closest_one_and_what_the_loss_takes():
    spec = loss_spec("generalized_jsd")
    with pytest.raises(ValueError, match=r"loss 'generalized_jsd' has no parameter 'betta' \(did you mean 'beta'\?\); "
                                         r"it takes: beta, check_finite, sparse_policy, temperature$"):
        spec.validate_params({"betta": 0.3})
    with pytest.raises(ConfigError, match="has no parameter 'zzz'; it takes"):  # nothing close: no suggestion
        spec.validate_params({"zzz": 1})
    with pytest.raises(ConfigError, match="has no parameter 'mask'"):  # set by the trainer, not configurable
        loss_spec("forward_kl").validate_params({"mask": None})


def test_validate_params_checks_types_strictly_and_returns_only_the_given_keys():
    spec = loss_spec("generalized_jsd")
    assert spec.validate_params({"beta": 1, "temperature": 2.0}) == {"beta": 1.0, "temperature": 2.0}
    assert spec.validate_params({}) == {}
    with pytest.raises(ConfigError, match="beta: Input should be a valid number"):
        spec.validate_params({"beta": "0.5"})
    with pytest.raises(ConfigError, match="beta: Input should be a valid number"):
        spec.validate_params({"beta": True})
    with pytest.raises(ConfigError, match="sparse_policy"):
        spec.validate_params({"sparse_policy": "tail-bucket"})


# --------------------------------------------------------------------------------- declared needs


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_needs_labels_is_true_exactly_when_the_loss_fails_without_labels(spec):
    s, t, y = _inputs(1)
    if spec.needs_labels:
        with pytest.raises(KdforgeError, match="needs labels"):
            spec(s, t)
    else:  # labels are ignored
        torch.testing.assert_close(spec(s, t, **NON_TRIVIAL.get(spec.name, {})),
                                   spec(s, t, labels=y, **NON_TRIVIAL.get(spec.name, {})))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_needs_teacher_is_true_exactly_when_the_teacher_changes_the_value(spec):
    s, t, y = _inputs(2)
    params = NON_TRIVIAL.get(spec.name, {})
    other = torch.randn_like(t)
    a, b = spec(s, t, labels=y, **params), spec(s, other, labels=y, **params)
    if spec.needs_teacher:
        assert not torch.allclose(a, b)
    else:
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(spec(s, None, labels=y), a)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_sparse_ok_is_true_exactly_when_the_loss_accepts_a_sparse_teacher(spec):
    s, t, y = _inputs(3)
    sparse = SparseTeacher.from_logits(t, 4)
    if spec.sparse_ok:
        out = spec(s, sparse, labels=y)
        assert torch.isfinite(out)
        full = SparseTeacher.from_logits(t, V)  # k = V: exactly the dense loss
        torch.testing.assert_close(spec(s, full, labels=y), spec(s, t, labels=y))
    else:
        with pytest.raises(KdforgeError, match="dense teacher"):
            spec(s, sparse, labels=y)


def _tail_outcomes(p: torch.Tensor, k: int, m: int):
    """Every sampled-tail estimate ``p_hat`` of ``p`` ([V]) with its probability (exact top-k, ``m`` draws)."""
    top = p.topk(k).indices
    tail = [i for i in range(p.numel()) if i not in set(top.tolist())]
    r = p[tail].sum()
    for draw in itertools.product(tail, repeat=m):
        prob = torch.prod(torch.stack([p[j] / r for j in draw]))
        p_hat = torch.zeros_like(p)
        p_hat[top] = p[top]
        for j in draw:
            p_hat[j] += r / m
        yield prob, p_hat


#: losses whose one-vocabulary case (all this test can build) is not their general form: gold is the
#: generalised KL (linear in p) when every token is shared, but adds ULD's sorted L1 across vocabularies
ONE_VOCAB_DIFFERS = {"gold"}
LINEARITY_SPECS = [s for s in KD_SPECS if s.sparse_ok and s.name not in ONE_VOCAB_DIFFERS]


@pytest.mark.parametrize("spec", LINEARITY_SPECS, ids=[s.name for s in LINEARITY_SPECS])
def test_linear_in_teacher_is_true_exactly_when_a_sampled_tail_gives_an_unbiased_gradient(spec):
    """Exact expectation over every draw (V = 5, top-2 exact, 2 tail draws): ``E[grad(p_hat)]`` is
    the dense gradient for a linear loss (forward KL: ``q - p``) and differs for every other one
    (reverse KL weighs ``log p_hat``, which is ``-inf`` where a token was not drawn)."""
    params = NON_TRIVIAL.get(spec.name, {})
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 5, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    _, dense = _grad(spec, s, p.log().unsqueeze(0), **params)
    expected = torch.zeros_like(dense)
    for prob, p_hat in _tail_outcomes(p, 2, 2):
        _, grad = _grad(spec, s, p_hat.log().unsqueeze(0), check_finite=False, **params)
        expected = expected + prob * grad
    unbiased = bool(torch.isfinite(expected).all()) and torch.allclose(expected, dense, atol=1e-10)
    assert unbiased == spec.linear_in_teacher, spec.name


@pytest.mark.parametrize("spec", [s for s in KD_SPECS if s.sparse_ok], ids=[s.name for s in KD_SPECS if s.sparse_ok])
def test_a_sampled_tail_teacher_is_accepted_exactly_by_the_linear_losses(spec):
    s, t, _ = _inputs(5, v=12)
    signal, _ = sample_tail(t.unsqueeze(0).float(), 3, 8, [0])
    if spec.linear_in_teacher:
        assert torch.isfinite(spec(s.unsqueeze(0), signal))
    else:
        with pytest.raises(ConfigError, match="sampled-tail"):
            spec(s.unsqueeze(0), signal, **NON_TRIVIAL.get(spec.name, {}))


def test_forward_kl_gradient_averaged_over_sampled_tail_draws_matches_the_dense_gradient_reverse_kl_does_not():
    spec = loss_spec("forward_kl")
    g = torch.Generator().manual_seed(6)
    s = torch.randn(1, 1, 30, generator=g, dtype=torch.float64)
    t = torch.randn(1, 1, 30, generator=g) * 1.5
    _, dense = _grad(spec, s, t.double())
    draws = [sample_tail(t, 4, 6, [seed])[0] for seed in range(400)]
    mean = sum(_grad(spec, s, d)[1] for d in draws) / len(draws)
    assert (mean - dense).abs().max() < 5e-3  # Monte Carlo error ~ 1/sqrt(400) of a small tail gradient
    assert (mean - dense).abs().max() < 0.05 * dense.abs().max()
    # reverse KL of the same estimates (as dense log p_hat): infinite wherever a tail token was not drawn
    rkl = loss_spec("reverse_kl")
    dense_hat = draws[0].to_dense_logprobs(fill=float("-inf")).double()
    assert not torch.isfinite(rkl(s, dense_hat, check_finite=False))


# --------------------------------------------------------------------------------- closed-form kernels

KERNEL_SPECS = [s for s in SPECS if s.kernel is not None]


def _param_grid(spec: LossSpec) -> list[dict]:
    """Default parameters plus each float parameter in [0, 1] at its ends and inside."""
    grid = [{}]
    for name in spec.param_names:
        default = spec.param_defaults.get(name)
        if name != "temperature" and isinstance(default, float):
            grid += [{name: v} for v in (0.0, 0.3, 0.85, 1.0)]
    return grid


def test_the_losses_with_a_closed_form_are_the_divergence_family():
    assert {s.name for s in KERNEL_SPECS} == {"forward_kl", "reverse_kl", "generalized_jsd", "jsd", "tvd",
                                               "skew_forward_kl", "skew_reverse_kl"}


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=[s.name for s in KERNEL_SPECS])
def test_every_kernel_matches_the_autograd_value_and_gradient_of_its_loss(spec):
    s, t, _ = _inputs(7, n=6, v=13)
    covered = 0
    for params in _param_grid(spec):
        kernel = spec.kernel_for(t, params)
        if kernel is None:  # e.g. skew alpha = 1: the autograd path
            continue
        covered += 1
        logq = torch.log_softmax(s.detach(), -1)
        out = kernel(logq.clone(), logq.exp(), t)
        ref = spec(s, t, reduction="none", **params)
        (ref_g,) = torch.autograd.grad(ref.sum(), s)
        torch.testing.assert_close(out.per_pos, ref.detach(), msg=f"{spec.name} {params}")
        torch.testing.assert_close(out.grad * out.scale, ref_g, msg=f"{spec.name} {params}")
    assert covered >= 1


def test_kernel_for_is_none_where_the_closed_form_does_not_apply():
    t = torch.zeros(2, 4)
    assert loss_spec("forward_kl").kernel_for(SparseTeacher.from_logits(t, 2), {}) is None
    assert loss_spec("forward_kl").kernel_for(None, {}) is None
    assert loss_spec("adaptive_kl").kernel_for(t, {}) is None
    assert loss_spec("generalized_jsd").kernel_for(t, {"beta": 1.5}) is None
    assert loss_spec("generalized_jsd").kernel_for(t, {"beta": float("nan")}) is None
    assert loss_spec("forward_kl").kernel_for(t, {"betta": 0.5}) is None
    assert loss_spec("forward_kl").kernel_for(t, {"sparse_policy": "nope"}) is None
    assert loss_spec("skew_forward_kl").kernel_for(t, {"alpha": 1.0}) is None


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 15),
    v=st.integers(2, 19),
    chunk=st.integers(1, 16),
    spec=st.sampled_from(KERNEL_SPECS),
    param=st.sampled_from([None, 0.0, 0.2, 0.7, 1.0]),
    temperature=st.sampled_from([0.5, 1.0, 2.5]),
    ce_weight=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 10_000),
)
@example(n=1, v=2, chunk=1, spec=loss_spec("skew_forward_kl"), param=1.0, temperature=0.5, ce_weight=0.0, seed=0)
def test_property_chunked_closed_form_equals_the_unchunked_loss_for_every_kernel(n, v, chunk, spec, param,
                                                                                 temperature, ce_weight, seed):
    own = [k for k in spec.param_names if k != "temperature" and isinstance(spec.param_defaults.get(k), float)]
    params = {own[0]: param} if own and param is not None else {}
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = -100
    m = torch.rand(n, generator=g) < 0.8
    out = chunked_distillation_loss(h, w, t, loss=spec.name, labels=y, mask=m, ce_weight=ce_weight, chunk_size=chunk,
                                    temperature=temperature, **params)
    logits = h @ w.T
    ref = spec(logits, t, mask=m, labels=y, temperature=temperature, reduction="sum", **params)
    if ce_weight:
        ref = ref + ce_weight * loss_spec("cross_entropy")(logits, labels=y, mask=m, reduction="sum")
    torch.testing.assert_close(out["loss"], ref)
    # a loss constant in the student (skew KL at alpha = 1: KL(p || p)) has no graph: zero gradients
    expected = torch.autograd.grad(ref, [h, w]) if ref.requires_grad else (torch.zeros_like(h), torch.zeros_like(w))
    for got, exp in zip(torch.autograd.grad(out["loss"], [h, w]), expected):
        torch.testing.assert_close(got, exp)


def test_chunked_mean_counts_labelled_positions_only_for_a_loss_that_needs_labels():
    g = torch.Generator().manual_seed(8)
    h = torch.randn(6, 3, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 2, -100, 4])
    dkd = chunked_distillation_loss(h, w, t, loss="dkd", labels=y, reduction="mean")["kd"]
    ref = loss_spec("dkd")(h @ w.T, t, labels=y, reduction="mean")  # mean over the 4 labelled positions
    torch.testing.assert_close(dkd, ref)


# --------------------------------------------------------------------------------- CLI


def test_kdforge_losses_lists_each_specs_needs_abilities_params_and_paper(capsys):
    from kdforge.cli.losses import loss_rows
    from kdforge.cli.main import main

    rows = {r[0]: r for r in loss_rows()}
    assert set(rows) == set(LOSSES.names())
    assert rows["forward_kl"][1:5] == ("teacher", "yes", "yes", "yes") and "Hinton" in rows["forward_kl"][6]
    assert rows["dkd"][1:5] == ("teacher, labels", "-", "-", "-")
    assert rows["dkd"][5] == "alpha=1.0, beta=8.0, ignore_index=-100, temperature=4.0"
    assert rows["generalized_jsd"][5] == "beta=0.5" and rows["adaptive_kl"][4] == "-"
    assert rows["cross_entropy"][1:4] == ("labels", "n/a", "n/a")
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert "skew_reverse_kl" in out and "hidden_mse" in out
