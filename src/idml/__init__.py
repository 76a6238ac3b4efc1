"""idml: Introspective Deep Metric Learning."""

__version__ = "0.1.0"
