"""The error types windump raises: every front end prints them as one line, never a traceback."""


class WindumpError(Exception):
    """An expected failure: bad input, an unusable guest, an I/O problem.

    The message is one line that says what went wrong and, where it can, how to fix it.
    """


class SourceError(WindumpError):
    """A memory source cannot be opened or cannot give the bytes asked for."""


class FormatError(WindumpError):
    """Bytes that should hold a known structure (ELF, note, dump header) do not."""


class TranslationError(WindumpError):
    """A guest virtual address does not translate through the page tables."""


class WindumpWarning(UserWarning):
    """Something the user must know that does not stop the dump (what QEMU only warns about, a
    missing vCPU state): the dump is still written, with the guest's value kept."""
