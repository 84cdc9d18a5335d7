"""Text that came from packets or file names, made safe for a terminal (HTML uses html.escape)."""
import re

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text) -> str:
    """Replace control characters (terminal escape sequences included) with '?'."""
    return CONTROL.sub("?", str(text))
