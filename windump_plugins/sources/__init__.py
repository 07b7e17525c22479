"""The memory sources windump ships with, each registered as a plugin like any third-party one."""
