import pytest
import torch

from kdforge.config import validate
from kdforge.errors import ConfigError
from kdforge.losses import cross_entropy, forward_kl
from kdforge.train import LossTerm, Objective, TaskOutput, TrainConfig


def test_unknown_loss_name_is_a_config_error_naming_known_losses():
    with pytest.raises(ConfigError, match="(?s)unknown loss .forwrd_kl.*did you mean .forward_kl"):
        Objective([LossTerm("forwrd_kl", 1.0)])


def test_empty_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="no loss terms"):
        Objective([])


def test_term_weight_is_required_no_hidden_default():
    with pytest.raises(ConfigError, match="weight: required key is missing"):
        Objective([{"name": "forward_kl"}])


def test_same_loss_twice_needs_distinct_labels():
    with pytest.raises(ConfigError, match="distinct `label`"):
        Objective([LossTerm("forward_kl", 1.0), LossTerm("forward_kl", 0.5, {"temperature": 2.0})])
    obj = Objective([LossTerm("forward_kl", 1.0), LossTerm("forward_kl", 0.5, {"temperature": 2.0}, label="fkl_t2")])
    assert obj.keys == ["forward_kl", "fkl_t2"]


def test_objective_is_weighted_sum_of_sum_reduced_terms_over_normalizer():
    s = torch.randn(3, 5, 11)
    t = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    mask = labels != -100
    obj = Objective([LossTerm("forward_kl", 0.7, {"temperature": 2.0}), LossTerm("cross_entropy", 0.3)])
    value = obj(TaskOutput(s, t, labels, mask), normalizer=int(mask.sum()))
    fkl = forward_kl(s, t, mask=mask, temperature=2.0, reduction="mean")
    ce = cross_entropy(s, None, labels=labels, mask=mask, reduction="mean")
    torch.testing.assert_close(value.terms["forward_kl"], fkl)
    torch.testing.assert_close(value.terms["cross_entropy"], ce)
    torch.testing.assert_close(value.total, 0.7 * fkl + 0.3 * ce)


def test_train_config_requires_exactly_one_length_and_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="exactly one of max_steps or epochs"):
        validate(TrainConfig, {"lr": 1e-3})
    with pytest.raises(ConfigError, match="unknown key"):
        validate(TrainConfig, {"max_steps": 1, "grad_acum_steps": 2})
    assert validate(TrainConfig, {"epochs": 1.5}).epochs == 1.5


def test_chunked_objective_accepts_only_one_kd_term_plus_ce():
    with pytest.raises(ConfigError, match="chunked=True"):
        Objective([LossTerm("forward_kl", 1.0), LossTerm("reverse_kl", 1.0)], chunked=True)
    Objective([LossTerm("forward_kl", 1.0), LossTerm("cross_entropy", 1.0)], chunked=True)


def test_direct_construction_errors_are_readable_config_errors():
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(max_steps=1, lr="fast")
    with pytest.raises(ConfigError, match="weight"):
        LossTerm("forward_kl", -1.0)


def test_auto_chunking_covers_a_temperature_and_needs_a_student_with_an_lm_head():
    """``chunked="auto"`` takes the closed form for any temperature (the chunked path applies it
    around the kernel), but not for a plain module returning logits: it has no hidden states."""
    from kdforge.teachers import OnlineTeacher
    from kdforge.train import CausalLMTask

    from ._tiny import tiny_llama

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 11)

        def forward(self, input_ids, attention_mask=None):  # noqa: ANN001, ANN201
            return self.head(torch.zeros(*input_ids.shape, 4))

    objective = Objective([LossTerm("forward_kl", 0.9, {"temperature": 2.0}), LossTerm("cross_entropy", 0.1)])
    online = OnlineTeacher(tiny_llama(1))
    assert objective.use_chunked(CausalLMTask(), online, tiny_llama(2))
    assert not objective.use_chunked(CausalLMTask(), online, LogitsOnly())
