"""Student architectures and their registry: MobileNetV2 (width alpha, resolution rho) and any
timm model by name. No CLI, no HTTP: the application builds on this, never the reverse."""

from . import mobilenetv2, pruned  # noqa: F401  (register "mobilenetv2", "mobilenetv2_pruned")
from .measure import count_macs, count_params
from .pretrained import MODES as PRETRAINED_MODES
from .pretrained import Weights
from .registry import (
    STUDENT_MEAN,
    STUDENT_STD,
    StudentConfig,
    build_student,
    classifier_prefix,
    create_student,
    load_init,
    register_student,
    student_names,
)

__all__ = [
    "STUDENT_MEAN",
    "STUDENT_STD",
    "PRETRAINED_MODES",
    "StudentConfig",
    "Weights",
    "build_student",
    "classifier_prefix",
    "count_macs",
    "count_params",
    "create_student",
    "load_init",
    "register_student",
    "student_names",
]
