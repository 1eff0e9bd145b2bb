"""QMP commands: QEMU's names, argument checks and reply shapes (qapi/*.json), run against a Machine.

Each command is a method `cmd_<name with _ for ->` taking the checked arguments as keywords and returning
the "return" value; QmpError(class, desc) becomes the "error" reply. Commands run one at a time on the QMP
server's command thread, never on a vCPU thread; `migrate` runs the snapshot on a thread of its own."""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("hvm.qmp")

# The QEMU release whose QMP this speaks (migrate's "file:" URIs are 8.2's), reported by query-version.
QEMU_VERSION = {"major": 8, "minor": 2, "micro": 0}
PAUSE_TIMEOUT = 5.0


class QmpError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


# Argument types, with the names QEMU's errors use ("expected: string").
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "string"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "integer"),
    "[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "array"),
}

# name -> {argument: (type, required)}
SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "qmp_capabilities": {"enable": ("[str]", False)},
    "query-status": {},
    "stop": {},
    "cont": {},
    "system_reset": {},
    "system_powerdown": {},
    "system_wakeup": {},
    "quit": {},
    "query-cpus-fast": {},
    "query-version": {},
    "query-commands": {},
    "migrate": {"uri": ("str", True), "detach": ("bool", False), "resume": ("bool", False)},
    "query-migrate": {},
    "x-hvm-stats": {},
    "x-hvm-trace": {"enable": ("bool", True), "file": ("str", False), "filter": ("str", False),
                    "rip": ("bool", False)},
}


def check_arguments(name: str, args: dict) -> dict:
    """QEMU's input-visitor checks: a missing, unexpected or mistyped argument is a GenericError."""
    schema = SCHEMA[name]
    for key in args:
        if key not in schema:
            raise QmpError(f"Parameter '{key[:60]}' is unexpected")
    for key, (kind, required) in schema.items():
        if key not in args:
            if required:
                raise QmpError(f"Parameter '{key}' is missing")
            continue
        ok, what = _TYPES[kind]
        if not ok(args[key]):
            raise QmpError(f"Invalid parameter type for '{key}', expected: {what}")
    return {k.replace("-", "_"): v for k, v in args.items()}


def _jsonable(value: Any) -> Any:
    """Machine.stats() as JSON: dict keys that are ports or addresses become hex strings."""
    if isinstance(value, dict):
        return {(f"{k:#x}" if isinstance(k, int) else str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Commands:
    def __init__(self, machine, emit: Callable[[str, dict], None]) -> None:
        self.machine = machine
        self._emit = emit
        self._migration: dict[str, Any] = {}
        self._migration_lock = threading.Lock()
        self._migration_thread: threading.Thread | None = None

    @staticmethod
    def names() -> list[str]:
        return list(SCHEMA)

    def execute(self, name: str, args: dict) -> Any:
        kwargs = check_arguments(name, args)
        method = getattr(self, "cmd_" + name.replace("-", "_"))
        return method(**kwargs)

    # --- run state -------------------------------------------------------------------------------
    def _run_state(self) -> str:
        return self.machine.run_state

    def cmd_query_status(self) -> dict:
        status = self._run_state()
        return {"running": status == "running", "status": status}

    def cmd_stop(self) -> dict:
        state = self._run_state()
        if state in ("paused", "postmigrate") or (state in ("prelaunch", "inmigrate") and self.machine._launched):
            return {}      # (prelaunch after -S: frozen before its first instruction already)
        if state in ("prelaunch", "inmigrate") or self.machine.ended:
            raise QmpError(f"the VM is {state}: it cannot be stopped")
        try:
            self.machine.pause(timeout=PAUSE_TIMEOUT)
        except TimeoutError:
            raise QmpError(f"the vCPUs did not stop within {PAUSE_TIMEOUT:g} s; the VM runs on") from None
        except RuntimeError as e:
            raise QmpError(str(e)) from None
        return {}

    def cmd_cont(self) -> dict:
        state = self._run_state()
        if state == "running":
            return {}
        if self.machine.ended:
            # QEMU's words for a guest that powered off (with -no-shutdown) and is asked to continue
            raise QmpError("Resetting the Virtual Machine is required")
        if state == "suspended":
            return {}      # as QEMU's qmp_cont: only a wake-up event (system_wakeup) runs a sleeping guest
        if state in ("prelaunch", "inmigrate") and not self.machine._launched:
            raise QmpError(f"the VM is {state}: it starts by itself once its QMP client connected"
                           if state == "prelaunch" else
                           "the VM is waiting for its incoming state: it starts by itself")
        try:
            self.machine.resume()
        except RuntimeError as e:
            raise QmpError(str(e)) from None
        return {}

    def cmd_system_reset(self) -> dict:
        try:
            self.machine.system_reset()
        except (RuntimeError, OSError, ValueError) as e:
            raise QmpError(f"system_reset failed: {e}") from None
        return {}

    def cmd_system_powerdown(self) -> dict:
        try:
            self.machine.system_powerdown()
        except (RuntimeError, OSError, ValueError) as e:
            raise QmpError(str(e)) from None
        return {}   # Machine.system_powerdown emits POWERDOWN, as QEMU does

    def cmd_system_wakeup(self) -> dict:
        # QEMU's qemu_system_wakeup_request (reason "other"): the guest sees WAK_STS | PWRBTN_STS. The reply
        # comes once the vCPUs run again; Machine.wakeup emits WAKEUP.
        wakeup = getattr(self.machine, "wakeup", None)
        if wakeup is None or not wakeup("qmp", wait=True):
            raise QmpError("Unable to wake up: guest is not in suspended state")
        return {}

    def cmd_quit(self) -> dict:
        # The reply goes out first (the server queues it before calling after_reply), then the VM ends.
        return {}

    def after_quit(self) -> None:
        self.machine.request_stop(0, "quit by a QMP client")

    # --- information -----------------------------------------------------------------------------
    def cmd_query_version(self) -> dict:
        from hvm import __version__

        return {"qemu": dict(QEMU_VERSION), "package": f"hvm {__version__}"}

    def cmd_query_commands(self) -> list:
        return [{"name": n} for n in SCHEMA]

    def cmd_query_cpus_fast(self) -> list:
        out = []
        for i, t in enumerate(self.machine.threads):
            out.append({"cpu-index": i, "qom-path": f"/machine/unattached/device[{i}]",
                        "thread-id": t.native_id or os.getpid(),
                        "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                        "target": "x86_64"})
        return out

    def cmd_x_hvm_stats(self) -> dict:
        stats = self.machine.stats()
        out = _jsonable(stats.as_dict())
        out["total"] = stats.total
        return out

    # --- migration (snapshot to a file) -------------------------------------------------------------
    def cmd_migrate(self, uri: str, detach: bool = True, resume: bool = False) -> dict:
        if resume:
            raise QmpError("hvm has no postcopy migration to resume")
        if not uri.startswith("file:") or len(uri) == 5:
            scheme = uri.split(":", 1)[0][:20] if ":" in uri else uri[:40]
            raise QmpError(f"hvm migrates only to a file: 'file:PATH' (not {scheme!r})")
        path = uri[5:]
        if ",offset=" in path:
            raise QmpError("file: migration with an offset is not supported by hvm")
        state = self._run_state()
        if state in ("prelaunch", "inmigrate") or self.machine.ended:
            raise QmpError(f"the VM is {state}: there is nothing to migrate")
        with self._migration_lock:
            if self._migration.get("status") in ("setup", "active"):
                raise QmpError("There's a migration process in progress")
            self._migration = {"status": "setup", "started": time.monotonic()}
        self._emit("MIGRATION", {"status": "setup"})
        t = threading.Thread(target=self._migrate, args=(Path(os.path.expanduser(path)),), name="qmp-migrate",
                             daemon=True)
        self._migration_thread = t
        t.start()
        return {}

    def _migrate(self, path: Path) -> None:
        with self._migration_lock:
            self._migration["status"] = "active"
        self._emit("MIGRATION", {"status": "active"})
        error = None
        try:
            self.machine.snapshot(path)
        except Exception as e:  # SnapshotError, or anything the save raised: reported, never raised here
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            if type(e).__name__ != "SnapshotError":
                log.info("migrate to %s failed", path, exc_info=True)
        with self._migration_lock:
            m = self._migration
            m["total-time"] = int((time.monotonic() - m.pop("started")) * 1000)
            if error is None:
                m["status"] = "completed"
            else:
                m["status"] = "failed"
                m["error-desc"] = error
        self._emit("MIGRATION", {"status": "completed" if error is None else "failed"})

    def cmd_query_migrate(self) -> dict:
        with self._migration_lock:
            m = dict(self._migration)
        if "started" in m:
            m["total-time"] = int((time.monotonic() - m.pop("started")) * 1000)
        return m

    # --- exit tracing ------------------------------------------------------------------------------
    def cmd_x_hvm_trace(self, enable: bool, file: str | None = None, filter: str | None = None,
                        rip: bool = False) -> dict:
        with self._migration_lock:
            migrating = self._migration.get("status") in ("setup", "active")
        if migrating:   # the swap's pause and resume would run a VM the save means to leave stopped
            raise QmpError("There's a migration process in progress")
        if not enable:
            if file is not None or filter is not None or rip:
                raise QmpError("x-hvm-trace: 'file', 'filter' and 'rip' go with \"enable\": true")
            if self.machine.tracer is None:
                raise QmpError("exit tracing is not on")
            self._set_trace(None)
            return {}
        if file is None:
            raise QmpError("Parameter 'file' is missing")
        if self.machine.tracer is not None:
            raise QmpError("exit tracing is already on (stop it with {\"enable\": false} first)")
        from hvm.trace.filter import FilterError, parse_filter
        from hvm.trace.tracer import TraceConfig

        if filter is not None:
            try:
                parse_filter(filter)
            except FilterError as e:
                raise QmpError(str(e)) from None
        self._set_trace(TraceConfig(path=Path(os.path.expanduser(file)), filter=filter, rip=rip))
        return {}

    def _set_trace(self, config) -> None:
        from hvm.files import HostFileError

        try:
            self.machine.set_trace(config, pause_timeout=PAUSE_TIMEOUT)
        except HostFileError as e:
            raise QmpError(str(e)) from None
        except TimeoutError:
            raise QmpError(f"the vCPUs did not stop within {PAUSE_TIMEOUT:g} s; tracing is unchanged") from None
        except RuntimeError as e:
            raise QmpError(str(e)) from None
