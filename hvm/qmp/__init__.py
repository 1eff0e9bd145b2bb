"""QMP, the QEMU Machine Protocol, for hvm: a server on a UNIX socket (server.py), its commands
(commands.py) and the small client behind `hvm ctl` (client.py). See docs/lifecycle.md."""
from hvm.qmp.address import QmpAddress, QmpAddressError, parse_qmp_address

__all__ = ["QmpAddress", "QmpAddressError", "parse_qmp_address"]
