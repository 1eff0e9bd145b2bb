"""hvm.boot: loaders. Each writes an image into GuestMemory and returns a BootState; none calls KVM."""
from hvm.boot.errors import BootError
from hvm.boot.flat import load_flat
from hvm.boot.multiboot import Module, is_multiboot, load_multiboot
from hvm.boot.state import BootState, Segment

__all__ = ["BootError", "BootState", "Module", "Segment", "is_multiboot", "load_flat", "load_multiboot"]
