"""A model of a crashed Windows x64 guest: the ``sample:`` source, the unit tests' fixtures and the
boot contract with the bare-metal test guest in ``drivers/``."""
