"""gdb target descriptions (``target.xml`` and the documents it includes): which registers a stub
has, and where each sits in its ``g`` reply."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Register:
    """One register of the stub's target description: where it sits in a ``g`` reply."""

    name: str
    regnum: int
    bitsize: int
    offset: int  # in bytes within the ``g`` reply

    @property
    def size(self) -> int:
        return self.bitsize // 8


_XML_ELEMENT = re.compile(rb"<(reg|xi:include)\s([^>]*)>")
_XML_ATTRIBUTE = re.compile(rb"([\w:-]+)\s*=\s*\"([^\"]*)\"")


def _elements(document: bytes) -> Iterator[tuple[bytes, dict[str, str]]]:
    """``(tag, attributes)`` of each ``reg`` and ``xi:include`` in document order.

    A pattern, not an XML parser: QEMU's ``target.xml`` uses the ``xi`` prefix without declaring it.
    """
    document = re.sub(rb"<!--.*?-->", b"", document, flags=re.DOTALL)
    for match in _XML_ELEMENT.finditer(document):
        yield match[1], {name.decode(): value.decode() for name, value in _XML_ATTRIBUTE.findall(match[2])}


def parse_target_description(documents: dict[str, bytes], root: str = "target.xml") -> list[Register]:
    """The registers of a target description, following ``xi:include``, in ``g`` order.

    A ``<reg>`` without ``regnum`` takes the number after the previous one, as gdb numbers them.
    """
    registers: list[Register] = []
    regnum = 0

    def walk(name: str) -> None:
        nonlocal regnum
        for tag, attributes in _elements(documents[name]):
            if tag == b"xi:include":
                walk(attributes["href"])
            else:
                regnum = int(attributes.get("regnum", regnum))
                registers.append(Register(attributes["name"], regnum, int(attributes["bitsize"]), 0))
                regnum += 1

    walk(root)
    registers.sort(key=lambda register: register.regnum)
    placed = []
    offset = 0
    for register in registers:
        placed.append(Register(register.name, register.regnum, register.bitsize, offset))
        offset += register.size
    return placed


def xml_includes(document: bytes) -> list[str]:
    """The ``href`` of every ``xi:include`` in a target-description document."""
    return [attributes["href"] for tag, attributes in _elements(document) if tag == b"xi:include"]
