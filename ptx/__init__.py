"""ptx: soft prompt tuning and prompt transferability studies on frozen PLMs."""

__version__ = "0.1.0"
