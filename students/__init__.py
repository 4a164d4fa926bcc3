"""Student architectures and their registry: MobileNetV1 and MobileNetV2 (width alpha, resolution
rho) and any timm model by name. No CLI, no HTTP: the application builds on this, never the reverse."""

# Imported for their @register_student: "mobilenetv1", "mobilenetv2", "mobilenetv2_pruned".
from . import mobilenetv1, mobilenetv2, pruned  # noqa: F401
from .measure import count_macs, count_params, separable_costs
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
    "separable_costs",
    "student_names",
]
