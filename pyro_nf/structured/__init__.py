"""The structured local-global guide for hierarchical models (`AutoStructuredFlow`)."""

from .guide import AutoStructuredFlow

__all__ = ["AutoStructuredFlow"]
