"""pcapflow: TCP connection teardown analysis of pcap/pcapng captures.

    import pcapflow
    a = pcapflow.analyze("capture.pcap")
    a.connections, a.events, a.findings
"""
from .analysis import Analysis, analyze
from .capture import CaptureError

__all__ = ["Analysis", "CaptureError", "analyze"]
__version__ = "0.1.0"
