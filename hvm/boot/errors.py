class BootError(Exception):
    """The image to boot is unusable: wrong format, does not fit, bad header. The message says why."""
