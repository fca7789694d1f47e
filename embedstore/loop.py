"""Placeholder: filled by its stage."""


class LoopMixin:
    pass
