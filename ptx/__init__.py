"""ptx: soft prompt tuning and prompt transferability studies on frozen PLMs."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import ptx` stays light; ptx.transfer_matrix loads torch on first use
    if name == "transfer_matrix":
        from ptx.transfer import transfer_matrix
        return transfer_matrix
    raise AttributeError(f"module 'ptx' has no attribute {name!r}")
