"""A whole lifecycle from outside, as a QEMU user would drive it: the counting guest (firmware/count.S) under
`hvm run --qmp`, driven by the real qemu.qmp client: stop (the console stops growing), cont (it grows),
migrate to a file (postmigrate), quit; then a NEW hvm process restores the file with `--incoming` and the
count goes on to its end. The two console files joined must be exactly 0..N-1 and "done": no number lost
or repeated across the processes. Bounded: hvm's --timeout, the test's waits, a kill at the end."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIRMWARE, ROOT, write_yaml

pytest.importorskip("qemu.qmp")
from qemu.qmp import QMPClient  # noqa: E402

COUNT = 400
EXPECTED = b"".join(b"%d\n" % i for i in range(COUNT)) + b"done\n"
STATUS = 43             # the count guest's debug-exit status
WAIT = 15.0


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_until(predicate, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert proc.poll() is None, f"hvm ended early ({proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


async def next_event(client: QMPClient, name: str) -> dict:
    async def find():
        async for event in client.events:
            if event["event"] == name:
                return event
    return await asyncio.wait_for(find(), WAIT)


def test_stop_cont_migrate_quit_then_incoming_continues_the_count(tmp_path):
    cfg = write_yaml(tmp_path, f"""
name: count
memory: 16M
timeout: 60
boot: {{image: {FIRMWARE / 'count.bin'}, mode: real, regs: {{rdi: {COUNT}}}}}
devices: {{serial: {{output: 'file:{tmp_path / "before.txt"}', input: none}}}}
""", "count.yaml")
    sock, before, after, snap = tmp_path / "vm.sock", tmp_path / "before.txt", tmp_path / "after.txt", tmp_path / "vm.snap"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "-m", "hvm", "run", str(cfg), "--qmp", f"unix:{sock},server=on,wait=off"],
                             cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    second = None
    try:
        wait_until(sock.exists, "the QMP socket", first)
        wait_until(lambda: lines(before) >= 5, "the first numbers", first)

        async def drive():
            client = QMPClient("e2e")
            await asyncio.wait_for(client.connect(str(sock)), WAIT)
            await client.execute("stop")
            await next_event(client, "STOP")
            assert await client.execute("query-status") == {"running": False, "status": "paused"}
            frozen = before.read_bytes()
            await asyncio.sleep(0.5)
            assert before.read_bytes() == frozen, "a stopped guest printed"
            await client.execute("cont")
            await next_event(client, "RESUME")
            deadline = time.monotonic() + WAIT
            while lines(before) < frozen.count(b"\n") + 3:
                assert time.monotonic() < deadline, "the guest did not count on after cont"
                await asyncio.sleep(0.02)
            await client.execute("migrate", {"uri": f"file:{snap}"})
            statuses = []
            while not statuses or statuses[-1] not in ("completed", "failed"):
                statuses.append((await next_event(client, "MIGRATION"))["data"]["status"])
            assert statuses[-1] == "completed", await client.execute("query-migrate")
            assert await client.execute("query-status") == {"running": False, "status": "postmigrate"}
            await client.execute("quit")
            shutdown = await next_event(client, "SHUTDOWN")
            assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
            try:
                await client.disconnect()
            except EOFError:
                pass

        asyncio.run(asyncio.wait_for(drive(), 60))
        assert first.wait(WAIT) == 0
        saved = before.read_bytes()
        assert COUNT // 2 > saved.count(b"\n") >= 8      # saved mid-count

        second = subprocess.run([sys.executable, "-m", "hvm", "run", "--incoming", f"file:{snap}",
                                 "--serial", f"file:{after}", "--timeout", "60"],
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=90)
        assert second.returncode == STATUS, second.stderr.decode()
        assert saved + after.read_bytes() == EXPECTED
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(5)
