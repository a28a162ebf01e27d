"""Kept for configs with ``custom_imports=dict(imports=['hieradet_mmdet.runtime'])``; importing
``hieradet_mmdet`` registers everything (see :mod:`hieradet_mmdet.engine`)."""
