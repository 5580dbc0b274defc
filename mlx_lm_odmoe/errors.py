"""The errors odmoe raises. Each also derives from the built-in a caller
would catch without knowing odmoe (as huggingface_hub's errors do), and
every message names the file, variable or option at fault and the fix."""


class OdmoeError(Exception):
    """Base of every odmoe error; console commands print these without a traceback."""


class SettingsError(OdmoeError, ValueError):
    """An ``odmoe`` config key, environment variable or ``load()`` argument is wrong."""


class BudgetError(SettingsError):
    """The expert cache budget cannot be read or cannot hold what must be resident."""


class LayoutError(OdmoeError, ValueError):
    """The expert files do not match their index or config.json."""


class ExpertReadError(OdmoeError, OSError):
    """An expert's bytes could not be read or failed their checksum."""


class ConversionError(OdmoeError, ValueError):
    """A checkpoint cannot be converted as asked."""


class GGUFError(ConversionError):
    """A GGUF file cannot be read or converted."""


class ModelNotFoundError(OdmoeError, FileNotFoundError):
    """A model folder does not exist (and is not a Hub id)."""


class BackendError(OdmoeError, RuntimeError):
    """The model cannot run on this machine's MLX backend (as converted)."""
