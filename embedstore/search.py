"""Placeholder: filled by its stage."""


class SearchMixin:
    pass
