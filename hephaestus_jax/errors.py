"""The base class of every error that bad input raises (a file, flag, binding or checkpoint the user named).

Library modules raise a subclass naming what is wrong (ConfigError, CheckpointError, ConversionError,
ForgeFormatError, ...); a command (hephaestus_jax/command.py) prints it as one line and exits 2. Anything else
that escapes a command is a bug and keeps its traceback. Standard library only: every layer may import it.
"""


class InputError(Exception):
    """Bad input from the person running a command; the message names the file, flag or binding."""


class MissingExtra(InputError):
    """An optional dependency a command needs is not installed; the message says which extra installs it."""
