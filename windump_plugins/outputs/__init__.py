"""Output formats: how a crash dump's header and pages lie in its file (``full`` now), and the checks
and lookups the writer makes of a format's layout."""
