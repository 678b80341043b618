"""Recorded numbers: refactors of the recipes and the trainer change no arithmetic.

The expected values below were printed by the recipes *before* they were rewritten on the sub-run
layer (commit df305a6, one torch thread): a tiny ``llm_kd`` run (labels only, KD from the top-k
cache, a TAID schedule and on-policy GKD; two seeds) and a tiny ``fashion_mnist_kd`` run on
synthetic images. The same config and seeds must give the same metrics (timings aside).

They were recorded on one CPU; another CPU model runs other BLAS kernels, and the same code then
differs in the last bits (measured on an AMD EPYC against the recorded values: perplexities by
at most 2e-8 relative, KL/JS to the teacher by at most 2e-8 absolute, two-seed standard
deviations by at most 1.6e-6 absolute). So floats are compared with ``rel=1e-6, abs=1e-7`` and
standard deviations with ``abs=5e-6``: far tighter than the gaps between the methods in this
table (perplexity 62.70-62.80, KL to the teacher 1.3032e-3 labels-only vs 1.2999e-3 KD), so a
change of training arithmetic still fails here. Integers, strings and lists compare exactly. If a deliberate
change alters them, re-record them and say why in the commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdforge.config import validate
from kdforge.data.vision import write_synthetic_fashion_mnist
from kdforge.recipes import load_recipe_file
from kdforge.recipes.llm_kd import LLMKD, LLMKDConfig

from ._tiny import seeded_teacher_and_corpus as _seeded_teacher_and_corpus

REPO = Path(__file__).resolve().parents[2]
CE = {"name": "cross_entropy", "weight": 1.0}
TIMING = ("per_s", "time", "seconds", "latency", "throughput")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions are bit-reproducible at a fixed thread count
    yield
    torch.set_num_threads(threads)


def _llm_config(root: Path) -> LLMKDConfig:
    return validate(LLMKDConfig, {
        "teacher": {"model": str(root / "teacher")}, "student": {"layers": "first_last"},
        "data": {"corpus": str(root / "corpus"), "train_docs": ["book_a"], "eval_docs": ["book_b"],
                 "seq_len": 16, "train_sequences": 8, "eval_sequences": 4},
        "cache": {"k": 8, "batch_size": 4},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "eval_every": 2, "progress": False},
        "eval": {"batch_size": 2, "during_training_sequences": 2, "speed_batch": 2, "speed_repeats": 1},
        "methods": [
            {"name": "labels only", "role": "baseline", "objective": [CE]},
            {"name": "kd", "objective": [{"name": "forward_kl", "weight": 1.0,
                                          "params": {"sparse_policy": "tail_bucket"}},
                                         {"name": "cross_entropy", "weight": 0.5}]},
            {"name": "taid", "objective": [{"name": "taid", "weight": 1.0}, {"name": "cross_entropy", "weight": 0.0}],
             "taid": {"t_start": 0.4, "mode": "linear"}},
            {"name": "gkd", "objective": [{"name": "generalized_jsd", "weight": 1.0, "params": {"beta": 0.5}}],
             "on_policy": {"lmbda": 1.0, "max_new_tokens": 4, "prompt_tokens": 6}},
        ],
        "seeds": [0, 1], "plot": False, "save_students": False,
    }, source="test")


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(t in k for t in TIMING)}


def _mismatches(got, expected, path="") -> list[str]:
    """Where ``got`` differs from ``expected``: floats within the cross-CPU tolerance (module
    docstring), everything else exactly."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(got) != set(expected):
            return [f"{path}: keys {sorted(set(got) ^ set(expected))} differ"]
        return [m for k in expected for m in _mismatches(got[k], expected[k], f"{path}.{k}")]
    if isinstance(expected, list) and isinstance(got, list) and len(got) == len(expected):
        return [m for i, (g, e) in enumerate(zip(got, expected)) for m in _mismatches(g, e, f"{path}[{i}]")]
    if isinstance(expected, float) and isinstance(got, float):
        # a two-seed std is a difference of two near-equal values: it carries their absolute noise
        tolerance = {"abs": 5e-6} if path.endswith("_std") else {"rel": 1e-6, "abs": 1e-7}
        ok = got == pytest.approx(expected, **tolerance)
    else:
        ok = got == expected
    return [] if ok else [f"{path}: got {got!r}, recorded {expected!r}"]


def test_llm_kd_gives_the_recorded_metrics(tmp_path, one_thread):
    root = _seeded_teacher_and_corpus(tmp_path / "setup")
    results = LLMKD().run(_llm_config(root), tmp_path / "run")
    got = {}
    for row in results["models"]:
        got[row["name"]] = _untimed(row["metrics"])
        if "per_seed" in row:
            got[row["name"]]["per_seed"] = [_untimed(p) for p in row["per_seed"]]
    assert _mismatches(got, LLM_EXPECTED) == []
    assert _mismatches(results["student_init"], LLM_STUDENT_INIT) == []


def test_fashion_mnist_gives_the_recorded_metrics(tmp_path, one_thread):
    data = write_synthetic_fashion_mnist(tmp_path / "fm", n_train=200, n_test=50)
    recipe, config = load_recipe_file(REPO / "configs" / "fashion_mnist.yaml", {
        "data.root": str(data), "data.labelled": 40, "data.transfer": 60, "teacher.arch": "mlp",
        "teacher.kwargs": {"hidden": [256]}, "teacher.epochs": 1, "teacher.batch_size": 64,
        "train.epochs": 2, "train.batch_size": 32, "seeds": [0, 1], "eval.latency_warmup": 1,
        "eval.latency_repeats": 3})
    results = recipe.run(config, tmp_path / "run")
    got = {m["name"]: {"metrics": _untimed(m["metrics"]), "per_seed": [_untimed(p) for p in m["per_seed"]],
                        "per_class_accuracy": m["per_class_accuracy"]} for m in results["models"]}
    assert _mismatches(got, FASHION_MNIST_EXPECTED) == []


LLM_STUDENT_INIT = {'agreement': 0.9833333333333333,
 'ece': 0.02806820416202148,
 'js_to_teacher': 0.000345684044683973,
 'kl_to_teacher': 0.0013826016957561174,
 'nll': 4.1405251344045,
 'params': 20576,
 'perplexity': 62.835810032406236,
 'source_layers': [0, 3],
 'token_accuracy': 0.0,
 'trainable_params': 18592}

LLM_EXPECTED = {'student / gkd': {'agreement': 0.9833333333333333,
                   'agreement_std': 0.0,
                   'ece': 0.02797606357683738,
                   'ece_std': 6.221331431066843e-05,
                   'js_to_teacher': 0.0003275137860327959,
                   'js_to_teacher_std': 2.4864138152297115e-05,
                   'kl_to_teacher': 0.001309599696348111,
                   'kl_to_teacher_std': 9.85221657582955e-05,
                   'nll': 4.138434539238611,
                   'nll_std': 0.0013722873385654153,
                   'per_seed': [{'agreement': 0.9833333333333333,
                                 'ece': 0.027932072120408217,
                                 'js_to_teacher': 0.00034509538672864435,
                                 'kl_to_teacher': 0.0013792653878529867,
                                 'nll': 4.137464185555776,
                                 'perplexity': 62.64376689907698,
                                 'seed': 0,
                                 'token_accuracy': 0.0,
                                 'train_loss_last': 0.0002641346654854715},
                                {'agreement': 0.9833333333333333,
                                 'ece': 0.028020055033266544,
                                 'js_to_teacher': 0.00030993218533694746,
                                 'kl_to_teacher': 0.001239934004843235,
                                 'nll': 4.139404892921448,
                                 'perplexity': 62.76545816428456,
                                 'seed': 1,
                                 'token_accuracy': 0.0,
                                 'train_loss_last': 0.00023785851954016834}],
                   'perplexity': 62.704612531680766,
                   'perplexity_std': 0.08604871883945078,
                   'token_accuracy': 0.0,
                   'token_accuracy_std': 0.0,
                   'train_loss_last': 0.0002509965925128199,
                   'train_loss_last_std': 1.8580040981371256e-05},
 'student / kd': {'agreement': 0.9833333333333333,
                  'agreement_std': 0.0,
                  'ece': 0.027980188637350994,
                  'ece_std': 2.166148254959084e-05,
                  'js_to_teacher': 0.0003249329514801502,
                  'js_to_teacher_std': 5.882756138326037e-06,
                  'kl_to_teacher': 0.001299866692473491,
                  'kl_to_teacher_std': 2.3679811709141052e-05,
                  'nll': 4.139689280589422,
                  'nll_std': 0.00013637877241205333,
                  'per_seed': [{'agreement': 0.9833333333333333,
                                'ece': 0.027964871656149626,
                                'js_to_teacher': 0.0003207732147226731,
                                'kl_to_teacher': 0.0012831225370367367,
                                'nll': 4.139785714944204,
                                'perplexity': 62.78936518489296,
                                'seed': 0,
                                'token_accuracy': 0.0,
                                'train_loss_last': 2.0538246631622314},
                               {'agreement': 0.9833333333333333,
                                'ece': 0.027995505618552366,
                                'js_to_teacher': 0.00032909268823762733,
                                'kl_to_teacher': 0.0013166108479102452,
                                'nll': 4.139592846234639,
                                'perplexity': 62.77725624881032,
                                'seed': 1,
                                'token_accuracy': 0.0,
                                'train_loss_last': 2.031507730484009}],
                  'perplexity': 62.78331071685164,
                  'perplexity_std': 0.008562310816989422,
                  'token_accuracy': 0.0,
                  'token_accuracy_std': 0.0,
                  'train_loss_last': 2.04266619682312,
                  'train_loss_last_std': 0.015780454432054898},
 'student / labels only': {'agreement': 0.9833333333333333,
                           'agreement_std': 0.0,
                           'ece': 0.027983526124929388,
                           'ece_std': 2.217624483999815e-05,
                           'js_to_teacher': 0.00032577188685536387,
                           'js_to_teacher_std': 6.028601795360576e-06,
                           'kl_to_teacher': 0.0013032476728161177,
                           'kl_to_teacher_std': 2.419624231230107e-05,
                           'nll': 4.13963020046552,
                           'nll_std': 6.629699270763631e-05,
                           'per_seed': [{'agreement': 0.9833333333333333,
                                         'ece': 0.027967845151821772,
                                         'js_to_teacher': 0.000321509021644791,
                                         'kl_to_teacher': 0.0012861383457978567,
                                         'nll': 4.139677079518636,
                                         'perplexity': 62.78254440598076,
                                         'seed': 0,
                                         'token_accuracy': 0.0,
                                         'train_loss_last': 4.106970310211182},
                                        {'agreement': 0.9833333333333333,
                                         'ece': 0.027999207098037004,
                                         'js_to_teacher': 0.0003300347520659367,
                                         'kl_to_teacher': 0.0013203569998343787,
                                         'nll': 4.139583321412404,
                                         'perplexity': 62.77665830945179,
                                         'seed': 1,
                                         'token_accuracy': 0.0,
                                         'train_loss_last': 4.062278747558594}],
                           'perplexity': 62.779601357716274,
                           'perplexity_std': 0.004162098770352021,
                           'token_accuracy': 0.0,
                           'token_accuracy_std': 0.0,
                           'train_loss_last': 4.084624528884888,
                           'train_loss_last_std': 0.031601707013468344},
 'student / taid': {'agreement': 0.9833333333333333,
                    'agreement_std': 0.0,
                    'ece': 0.027785026468336582,
                    'ece_std': 1.9577035521442137e-05,
                    'js_to_teacher': 0.0003202214953489602,
                    'js_to_teacher_std': 2.0073803083167355e-05,
                    'kl_to_teacher': 0.0012804803748925528,
                    'kl_to_teacher_std': 7.996345956103137e-05,
                    'nll': 4.139970270792643,
                    'nll_std': 0.0010023138729669597,
                    'per_seed': [{'agreement': 0.9833333333333333,
                                  'ece': 0.027798869522909324,
                                  'js_to_teacher': 0.0003344158176332712,
                                  'kl_to_teacher': 0.0013370230793952943,
                                  'nll': 4.139261527856191,
                                  'perplexity': 62.756460435274384,
                                  'seed': 0,
                                  'taid_t_final': 1.0,
                                  'token_accuracy': 0.0,
                                  'train_loss_last': 0.00014099337568040937},
                                 {'agreement': 0.9833333333333333,
                                  'ece': 0.02777118341376384,
                                  'js_to_teacher': 0.0003060271730646491,
                                  'kl_to_teacher': 0.0012239376703898112,
                                  'nll': 4.140679013729096,
                                  'perplexity': 62.84547990839234,
                                  'seed': 1,
                                  'taid_t_final': 1.0,
                                  'token_accuracy': 0.0,
                                  'train_loss_last': 0.00013680654228664935}],
                    'perplexity': 62.80097017183336,
                    'perplexity_std': 0.06294627309936143,
                    'taid_t_final': 1.0,
                    'taid_t_final_std': 0.0,
                    'token_accuracy': 0.0,
                    'token_accuracy_std': 0.0,
                    'train_loss_last': 0.00013889995898352936,
                    'train_loss_last_std': 2.9605382844260006e-06},
 'teacher': {'ece': 0.0267166414608558,
             'nll': 4.142683176199595,
             'perplexity': 62.97155875971495,
             'token_accuracy': 0.0}}

FASHION_MNIST_EXPECTED = {'student / DKD': {'metrics': {'accuracy': 0.10999999940395355,
                               'accuracy_gain_vs_baseline': -0.25,
                               'accuracy_std': 0.014142132673451555,
                               'agreement': 0.12000000104308128,
                               'agreement_std': 0.028284270615259174,
                               'ece': 0.06844727694988251,
                               'ece_std': 0.03325823621062839,
                               'kl_to_teacher': 0.5858945548534393,
                               'kl_to_teacher_std': 0.025479497945624388,
                               'nll': 2.2306010723114014,
                               'nll_std': 0.031824242373605864},
                   'per_class_accuracy': [0.0,
                                          0.0,
                                          0.0,
                                          0.0,
                                          0.0,
                                          0.10000000149011612,
                                          0.0,
                                          0.7000000029802322,
                                          0.30000001192092896,
                                          0.0],
                   'per_seed': [{'accuracy': 0.10000000149011612,
                                 'agreement': 0.10000000149011612,
                                 'ece': 0.09196440130472183,
                                 'kl_to_teacher': 0.603911280632019,
                                 'seed': 0},
                                {'accuracy': 0.11999999731779099,
                                 'agreement': 0.14000000059604645,
                                 'ece': 0.04493015259504318,
                                 'kl_to_teacher': 0.5678778290748596,
                                 'seed': 1}]},
 'student / KD + transfer set': {'metrics': {'accuracy': 0.9199999868869781,
                                             'accuracy_gain_vs_baseline': 0.5599999874830246,
                                             'accuracy_std': 0.028284286420327365,
                                             'agreement': 0.8799999952316284,
                                             'agreement_std': 0.05656857284065473,
                                             'ece': 0.5209463819861413,
                                             'ece_std': 0.01859359767653813,
                                             'kl_to_teacher': 0.047812554985284805,
                                             'kl_to_teacher_std': 6.660782571540415e-05,
                                             'nll': 0.9364957511425018,
                                             'nll_std': 0.0005927954243057246},
                                 'per_class_accuracy': [1.0,
                                                        0.7000000029802322,
                                                        0.5,
                                                        1.0,
                                                        1.0,
                                                        1.0,
                                                        1.0,
                                                        1.0,
                                                        1.0,
                                                        1.0],
                                 'per_seed': [{'accuracy': 0.9399999976158142,
                                               'agreement': 0.8399999737739563,
                                               'ece': 0.5340940409898758,
                                               'kl_to_teacher': 0.04776545614004135,
                                               'seed': 0},
                                              {'accuracy': 0.8999999761581421,
                                               'agreement': 0.9200000166893005,
                                               'ece': 0.5077987229824067,
                                               'kl_to_teacher': 0.04785965383052826,
                                               'seed': 1}]},
 'student / KD T=2 a=0.5': {'metrics': {'accuracy': 0.26999999582767487,
                                        'accuracy_gain_vs_baseline': -0.09000000357627869,
                                        'accuracy_std': 0.014142143210163683,
                                        'agreement': 0.29999999701976776,
                                        'agreement_std': 0.056568551767230475,
                                        'ece': 0.14830716595053672,
                                        'ece_std': 0.03530580407900676,
                                        'kl_to_teacher': 0.5674265623092651,
                                        'kl_to_teacher_std': 0.048689893861119264,
                                        'nll': 2.180896520614624,
                                        'nll_std': 0.05570498391466651},
                            'per_class_accuracy': [0.9000000059604645,
                                                   0.0,
                                                   0.0,
                                                   0.10000000149011612,
                                                   0.0,
                                                   0.30000001192092896,
                                                   0.4000000059604645,
                                                   0.0,
                                                   1.0,
                                                   0.0],
                            'per_seed': [{'accuracy': 0.2800000011920929,
                                          'agreement': 0.3400000035762787,
                                          'ece': 0.17327213943004607,
                                          'kl_to_teacher': 0.6018555164337158,
                                          'seed': 0},
                                         {'accuracy': 0.25999999046325684,
                                          'agreement': 0.25999999046325684,
                                          'ece': 0.12334219247102737,
                                          'kl_to_teacher': 0.5329976081848145,
                                          'seed': 1}]},
 'student / labels only': {'metrics': {'accuracy': 0.35999999940395355,
                                       'accuracy_gain_vs_baseline': 0.0,
                                       'accuracy_std': 0.02828426534690311,
                                       'agreement': 0.3400000035762787,
                                       'agreement_std': 0.05656853069380622,
                                       'ece': 0.23963650241494178,
                                       'ece_std': 0.01751058150975587,
                                       'kl_to_teacher': 0.5930692553520203,
                                       'kl_to_teacher_std': 0.04168812221170146,
                                       'nll': 2.180180788040161,
                                       'nll_std': 0.0621979588088608},
                           'per_class_accuracy': [1.0,
                                                  0.0,
                                                  0.5,
                                                  0.30000001192092896,
                                                  0.10000000149011612,
                                                  0.30000001192092896,
                                                  0.5,
                                                  0.0,
                                                  0.6000000014901161,
                                                  0.30000000447034836],
                           'per_seed': [{'accuracy': 0.3400000035762787,
                                         'agreement': 0.3799999952316284,
                                         'ece': 0.22725465148687363,
                                         'kl_to_teacher': 0.6225472092628479,
                                         'seed': 0},
                                        {'accuracy': 0.3799999952316284,
                                         'agreement': 0.30000001192092896,
                                         'ece': 0.2520183533430099,
                                         'kl_to_teacher': 0.5635913014411926,
                                         'seed': 1}]},
 'teacher': {'metrics': {'accuracy': 0.8999999761581421,
                         'ece': 0.4583924227952957,
                         'nll': 0.8477742075920105},
             'per_class_accuracy': [1.0,
                                    1.0,
                                    0.20000000298023224,
                                    1.0,
                                    1.0,
                                    1.0,
                                    0.800000011920929,
                                    1.0,
                                    1.0,
                                    1.0],
             'per_seed': [{'accuracy': 0.8999999761581421, 'seed': 0}]}}
