"""A Sphinx directive that renders a numpy structured dtype as a layout table (offset, field, type,
size), so the documented layout is the code's and cannot drift from it."""

from __future__ import annotations

import importlib

import numpy as np
from docutils import nodes
from docutils.parsers.rst import Directive


def _type_name(dtype: np.dtype) -> str:
    if dtype.subdtype is not None:
        element, shape = dtype.subdtype
        return f"{_type_name(element)}[{']['.join(map(str, shape))}]"
    if dtype.fields:
        return f"struct ({dtype.itemsize:#x} bytes)"
    if dtype.kind == "S":
        return f"char[{dtype.itemsize}]"
    return f"{'i' if dtype.kind == 'i' else 'u'}{dtype.itemsize * 8}"


def _row(cells: list[str]) -> nodes.row:
    row = nodes.row()
    for text in cells:
        entry = nodes.entry()
        entry += nodes.paragraph(text=text)
        row += entry
    return row


class DtypeLayout(Directive):
    """``.. dtype-layout:: package.module.NAME``: one row per field of the dtype, in offset order."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        module_name, _, name = self.arguments[0].rpartition(".")
        dtype = getattr(importlib.import_module(module_name), name)
        fields = sorted(((offset, field, sub) for field, (sub, offset, *_) in dtype.fields.items()))
        table = nodes.table()
        group = nodes.tgroup(cols=4)
        for width in (12, 30, 30, 12):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        head += _row(["Offset", "Field", "Type", "Size"])
        body = nodes.tbody()
        for offset, field, sub in fields:
            body += _row([f"{offset:#05x}", field, _type_name(sub), f"{sub.itemsize:#x}"])
        group += head
        group += body
        table += group
        return [table]


def setup(app):
    app.add_directive("dtype-layout", DtypeLayout)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
