"""The errors lorad raises on purpose. Each carries one line a user can act on."""


class LoradError(Exception):
    """Base: any error whose message is meant for the user as it is."""


class FormatError(LoradError):
    """The input is not a LoRA lorad can read (truncated, hostile, pickle, not a LoRA...)."""


class ReduceError(LoradError):
    """The requested reduction cannot be done (bad parameter, unreachable budget...)."""


class StoreError(LoradError):
    """A store or database operation was refused (path outside watched folders, corrupt blob...)."""


class TransientError(LoradError):
    """May succeed later without any change to the input: a full disk, a locked database."""


class OutputWriteError(ReduceError, TransientError):
    """The output could not be written (disk full, read-only folder); the input was fine."""


class NotRegularFileError(FormatError):
    """A path that is a FIFO, socket, device or directory where a file was expected."""


class PickleError(FormatError):
    """A pickle-based checkpoint (.ckpt/.pt): lorad never unpickles."""


class IncompleteError(FormatError):
    """A safetensors file whose data is shorter than its header says: still being written?"""
