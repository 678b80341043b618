"""kdforge.students: student models (from the teacher: :mod:`.from_teacher`; images: :mod:`.vision`)."""

from kdforge.students.dual_head import DualHeadStudent
from kdforge.students.from_teacher import (
    count_parameters,
    find_layers,
    narrow_student,
    select_layers,
    student_from_teacher,
)
from kdforge.students.vision import MLP, SmallCNN, TeacherCNN, build_vision_model

__all__ = ["DualHeadStudent", "MLP", "SmallCNN", "TeacherCNN", "build_vision_model", "count_parameters", "find_layers", "narrow_student", "select_layers", "student_from_teacher"]
