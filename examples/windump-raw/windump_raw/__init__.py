"""windump-raw: an example third-party windump plugin that reads raw guest RAM images."""
