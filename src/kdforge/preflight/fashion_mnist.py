"""Pre-flight of the ``fashion_mnist_kd`` recipe: the data folder, the model builders and their
kwargs, every method's terms and the output folder (:func:`check`); weights, AdamW state, the
cached teacher logits and the saved students (:func:`estimate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.preflight.checks import check_objective, check_output_dir
from kdforge.preflight.estimate import (
    Estimate,
    adamw_state_bytes,
    grad_bytes,
    logits_bytes,
    param_bytes,
)
from kdforge.preflight.problems import Problem, Problems

__all__ = ["check", "estimate", "probe"]

#: Fashion-MNIST: 60,000 training and 10,000 test images of 28 x 28, 10 classes
TRAIN_IMAGES, TEST_IMAGES, CLASSES = 60_000, 10_000, 10


def check(config: Any, output_dir: Path) -> list[Problem]:
    """Every problem of a ``fashion_mnist_kd`` config found without training."""
    problems = Problems()
    if config.data.root is not None:
        from kdforge.assets import fashion_mnist as asset

        missing = asset.missing_files(Path(config.data.root))
        if missing:
            problems.add("data.root", f"{config.data.root} lacks {', '.join(missing)} (.gz or raw)", asset.INSTALL_HELP)
    teachers = [("teacher", config.teacher), *((f"extra_teachers.{i}", t)
                                               for i, t in enumerate(getattr(config, "extra_teachers", [])))]
    for key, spec in [*teachers, ("student", config.student)]:
        _model(problems, key, spec.arch, spec.kwargs)
    for i, method in enumerate(config.methods):
        check_objective(problems, f"methods.{i}.terms", method.terms, teacher="dense", vocab_size=CLASSES)
        if getattr(method, "student", None) is not None:
            _model(problems, f"methods.{i}.student", method.student.arch, method.student.kwargs)
    check_output_dir(problems, "output_dir", output_dir)
    return problems.items


def _model(problems: Problems, key: str, arch: str, kwargs: dict[str, Any]) -> Any:
    """The model built on the meta device (no memory), or None with a problem recorded."""
    import torch

    from kdforge.students.vision import VISION_MODELS, build_vision_model

    with problems.catch(f"{key}.kwargs" if arch in VISION_MODELS else f"{key}.arch"), torch.device("meta"):
        return build_vision_model(arch, **kwargs)
    return None


def estimate(config: Any, output_dir: Path) -> Estimate | None:
    """Memory and disk of a ``fashion_mnist_kd`` run (sizes from the models built on ``meta``)."""
    import torch

    problems = Problems()
    teacher = _model(problems, "teacher", config.teacher.arch, config.teacher.kwargs)
    student = _model(problems, "student", config.student.arch, config.student.kwargs)
    if teacher is None or student is None:
        return None
    est = Estimate(device="cuda" if torch.cuda.is_available() else "cpu")
    images = TRAIN_IMAGES + TEST_IMAGES
    est.add("images (float32, normalised)", images * 28 * 28 * 4)
    est.add("teacher weights + grads + AdamW", param_bytes(teacher) + grad_bytes(teacher) + adamw_state_bytes(teacher))
    est.add("student weights + grads + AdamW", param_bytes(student) + grad_bytes(student) + adamw_state_bytes(student))
    est.add("cached teacher logits", logits_bytes(images, CLASSES, with_grad=False))
    runs = len(config.methods) * len(config.seeds)
    est.add("teacher folder (weights + logits)", param_bytes(teacher) + logits_bytes(images, CLASSES, with_grad=False),
            "disk")
    est.add("students", runs * param_bytes(student), "disk", note=f"{runs} (method, seed) runs")
    return est


def probe(config: Any, *, steps: int = 2) -> float | None:
    """Seconds per optimizer step of the student on a ``train.batch_size`` batch of 28 x 28 images
    (the first distillation method's terms against random teacher logits)."""
    import torch

    from kdforge.losses import LOSSES
    from kdforge.losses.dac_clip import with_stand_in_net
    from kdforge.preflight.probe import time_steps
    from kdforge.students.vision import build_vision_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    student = build_vision_model(config.student.arch, **config.student.kwargs).to(device)
    method = next((m for m in config.methods if m.role != "baseline"), config.methods[0])
    terms = [(LOSSES.get(t.name), t.weight, with_stand_in_net(t.name, t.params)) for t in method.terms
             if t.source == "loss" and not t.scheduled]
    n = config.train.batch_size

    def batch() -> dict[str, Any]:
        return {"x": torch.randn(n, 1, 28, 28, device=device), "y": torch.randint(0, CLASSES, (n,), device=device),
                "t": torch.randn(n, CLASSES, device=device)}

    def loss(model: Any, b: dict[str, Any]) -> Any:
        logits = model(b["x"])
        return sum(w * fn(logits, b["t"], labels=b["y"], **params) for fn, w, params in terms)

    return time_steps(student, batch, loss, steps=steps, lr=config.train.lr)
