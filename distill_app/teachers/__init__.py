"""Teachers: providers registered by spec prefix (local, timm, torchscript, hf, google, azure)."""

from .base import (
    DISTRIBUTION,
    MULTILABEL,
    SCORE_KINDS,
    TOPK,
    Answer,
    AuthError,
    Teacher,
    TeacherOptions,
    TransientError,
    create_teacher,
    get_key,
    register,
    split_spec,
    teacher_prefixes,
)

__all__ = [
    "DISTRIBUTION",
    "MULTILABEL",
    "SCORE_KINDS",
    "TOPK",
    "Answer",
    "AuthError",
    "Teacher",
    "TeacherOptions",
    "TransientError",
    "create_teacher",
    "get_key",
    "register",
    "split_spec",
    "teacher_prefixes",
]
