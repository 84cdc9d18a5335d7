"""pcapflow: TCP connection teardown analysis of pcap/pcapng captures.

    import pcapflow
    a = pcapflow.analyze("capture.pcap")
    a.connections, a.events, a.findings
"""
__all__ = ["Analysis", "CaptureError", "analyze"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The names above, imported when first used: the command line sets numpy's options
    before numpy is imported (cli.py)."""
    if name in ("Analysis", "analyze"):
        from . import analysis
        return getattr(analysis, name)
    if name == "CaptureError":
        from .capture import CaptureError
        return CaptureError
    raise AttributeError(f"module 'pcapflow' has no attribute {name!r}")
