"""User-facing errors.

Everything a user can get wrong (a config key, a template, a file, a column) raises a
subclass of `RayappError` whose message names the input and says what to do. The CLI
prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class RayappError(ValueError):
    """Base class for mistakes in user input (configs, data, prompts, URIs)."""


class ConfigError(RayappError):
    """A config file or `key=value` override is wrong."""


class PromptError(RayappError):
    """A task, template or verbalizer does not fit the tokenizer/model."""


class DataError(RayappError):
    """A data file, table, column or label is missing or malformed."""
