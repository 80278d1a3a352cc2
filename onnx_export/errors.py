"""Errors of the exporter: one line that names the file and what is wrong with it."""


class ExportError(Exception):
    """A model source or model directory cannot be used; the message names the file."""
