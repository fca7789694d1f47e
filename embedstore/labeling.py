"""Placeholder: filled by its stage."""


class LabelMixin:
    pass
