"""Teachers: providers registered by spec prefix (local, timm, torchscript, hf, google, azure)."""

from .base import (
    DISTRIBUTION,
    MULTILABEL,
    TOPK,
    Answer,
    AuthError,
    Teacher,
    TeacherOptions,
    TransientError,
    create_teacher,
    get_key,
    key_env_vars,
    register,
    split_spec,
)

__all__ = [
    "DISTRIBUTION",
    "MULTILABEL",
    "TOPK",
    "Answer",
    "AuthError",
    "Teacher",
    "TeacherOptions",
    "TransientError",
    "create_teacher",
    "get_key",
    "key_env_vars",
    "register",
    "split_spec",
]
