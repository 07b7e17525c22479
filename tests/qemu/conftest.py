"""Fixtures that boot the bare-metal test guest under QEMU (TCG) as a crashed Windows kernel and
take QEMU's own dumps of it.

Tests marked ``qemu`` skip loudly when QEMU or the guest's toolchain is missing, and fail instead
when ``WINDUMP_REQUIRE_QEMU=1`` (CI sets it where QEMU is installed); so do those that need gdb.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from gate import require
from qemu_guest import TOOLS, VARIANTS, Machine, QemuGuest, Variant, build_guest

from windump_plugins.guest.model import CrashedGuest


def require_qemu() -> None:
    """QEMU and the guest's toolchain, through the one gate: skip without them, fail under CI."""
    require(*TOOLS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gdb: needs gdb (skips without it unless WINDUMP_REQUIRE_QEMU=1)")


@pytest.fixture(autouse=True)
def _require_tools(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("qemu") is not None:
        require_qemu()
    if request.node.get_closest_marker("gdb") is not None:
        require("gdb")


@pytest.fixture(scope="session")
def guest_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test guest, built once per session from ``drivers/``."""
    require_qemu()
    return build_guest(tmp_path_factory.mktemp("guest-build"))


@pytest.fixture(scope="session")
def machine_ram(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Machine], np.ndarray]:
    """The RAM map of a machine, read once per (machine, memory) from an idle QEMU's
    ``info mtree -f``: what the model must be built for before the guest boots."""
    cache: dict[tuple[str, str], np.ndarray] = {}

    def ram(machine: Machine) -> np.ndarray:
        key = (machine.machine, machine.memory)
        if key not in cache:
            probe = QemuGuest(Machine(machine.machine, machine.memory, 1), tmp_path_factory.mktemp("ram-probe"))
            try:
                probe.start()
                cache[key] = probe.ram()
            finally:
                probe.kill()
        return cache[key]

    return ram


@dataclass
class BootedGuest:
    """A QEMU with the test guest booted from ``model`` and stopped (the running variant is left
    running), its RAM shared under /dev/shm; ``workdir`` holds its files."""

    variant: Variant
    model: CrashedGuest
    qemu: QemuGuest
    workdir: Path
    _win_dmp: tuple[Path, list[dict[str, int]]] | None = field(default=None, repr=False)

    def win_dmp(self) -> tuple[Path, list[dict[str, int]]]:
        """QEMU's win-dmp of the stopped guest and every vCPU's registers at that moment: the
        reference every comparison with this guest uses, taken once per boot."""
        if self._win_dmp is None:
            self.qemu.execute("stop")
            self._win_dmp = self.qemu.dump(self.workdir / "qemu.dmp"), self.qemu.registers()
        return self._win_dmp

    def close(self) -> None:
        """Kill QEMU and delete the guest's files (its reference dump included)."""
        self.qemu.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._win_dmp = None


@pytest.fixture(scope="session")
def boot_guest(guest_kernel: Path, machine_ram: Callable[[Machine], np.ndarray],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Variant], BootedGuest]]:
    """Boot a variant afresh; every QEMU started is killed by PID at the end of the session."""
    started: list[QemuGuest] = []

    def boot(variant: Variant) -> BootedGuest:
        model = CrashedGuest(ram=machine_ram(variant.machine), cpus=variant.machine.cpus, **variant.model)
        workdir = tmp_path_factory.mktemp(variant.name)
        qemu = QemuGuest(variant.machine, workdir, guest_kernel, model.image, shared_ram=True)
        started.append(qemu)
        qemu.boot()
        if not variant.model.get("keep_running"):
            qemu.wait_halted()
            qemu.execute("stop")  # a halted TCG guest still burns CPU on timer events
        return BootedGuest(variant, model, qemu, workdir)

    yield boot
    for qemu in started:
        qemu.kill()


@pytest.fixture(scope="session")
def booted_once(boot_guest: Callable[[Variant], BootedGuest]) -> Callable[[Variant], BootedGuest]:
    """Each variant's guest, booted on first use and shared by every test of the session."""
    guests: dict[str, BootedGuest] = {}

    def get(variant: Variant) -> BootedGuest:
        if variant.name not in guests:
            guests[variant.name] = boot_guest(variant)
        return guests[variant.name]

    return get


@pytest.fixture(params=VARIANTS, ids=lambda v: v.name)
def booted(request: pytest.FixtureRequest, booted_once: Callable[[Variant], BootedGuest]) -> BootedGuest:
    """The booted guest of each variant (tests narrow the list with indirect parametrization)."""
    return booted_once(request.param)
