"""kdforge.train: the distillation trainer.

Public API::

    from kdforge.train import (Distiller, TrainConfig, Objective, LossTerm, ClassificationTask,
                               CausalLMTask, Callback, EarlyStopping, OnPolicyConfig)

See ``docs/training.md``.
"""

from kdforge.train.callbacks import (
    Callback,
    EarlyStopping,
    JsonlLogger,
    ProgressBar,
    TrainerState,
    TrainingContext,
)
from kdforge.train.checkpoint import latest_checkpoint, verify_checkpoint
from kdforge.train.config import TrainConfig
from kdforge.train.ddk import DDKCallback, DDKSampler, ddk_update
from kdforge.train.distiller import Distiller
from kdforge.train.embedding_task import SentenceEmbeddingTask
from kdforge.train.hard import (
    FamilyRanges,
    HardAugmentNet,
    HardLearnedTransform,
    HardSearchTransform,
    save_augmentation_grid,
)
from kdforge.train.metrics import fidelity_sums
from kdforge.train.minillm import (
    MiniLLMConfig,
    TeacherMixedGenerator,
    minillm_objective,
    minillm_setup,
)
from kdforge.train.mixup import MixupTransform
from kdforge.train.objective import LossTerm, Objective, ObjectiveValue
from kdforge.train.onpolicy import (
    GenerateFn,
    HFGenerator,
    OnPolicyBatcher,
    OnPolicyConfig,
    VLLMSettings,
    make_generator,
)
from kdforge.train.preference import PreferencePair, build_pairs, train_dpo, train_sft
from kdforge.train.ranking_task import RankingTask
from kdforge.train.sampler import EpochSampler
from kdforge.train.taid import TAIDCallback
from kdforge.train.tasks import CausalLMTask, ClassificationTask, Task, TaskOutput
from kdforge.train.transforms import BatchTransform, OnPolicyTransform, StepContext
from kdforge.train.trilateral_meta import TrilateralBilevelDistiller, TrilateralMetaLearner

__all__ = [
    "BatchTransform", "Callback", "CausalLMTask", "ClassificationTask", "DDKCallback", "DDKSampler", "Distiller", "EarlyStopping", "EpochSampler",
    "FamilyRanges", "HardAugmentNet", "HardLearnedTransform", "HardSearchTransform", "save_augmentation_grid",
    "GenerateFn", "HFGenerator", "JsonlLogger", "LossTerm", "MixupTransform", "Objective", "ObjectiveValue",
    "OnPolicyBatcher", "OnPolicyConfig", "OnPolicyTransform", "StepContext", "ProgressBar", "RankingTask", "SentenceEmbeddingTask", "TAIDCallback", "Task", "TaskOutput", "TrainConfig",
    "PreferencePair", "build_pairs", "train_dpo", "train_sft",
    "MiniLLMConfig", "TeacherMixedGenerator", "minillm_objective", "minillm_setup",
    "TrainerState", "TrainingContext", "TrilateralBilevelDistiller", "TrilateralMetaLearner", "VLLMSettings", "ddk_update", "fidelity_sums", "latest_checkpoint", "make_generator", "verify_checkpoint",
]
