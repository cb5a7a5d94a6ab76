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


def find_user_error(exc: BaseException | None) -> RayappError | None:
    """The RayappError behind `exc`, also when Ray wrapped it on its way from a worker."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RayappError):
            # Ray re-raises a task's error as RayTaskError(ConfigError), an instance of both
            # whose str() is the whole remote traceback: the user wants the original
            cause = getattr(exc, "cause", None)
            return cause if isinstance(cause, RayappError) else exc
        for inner in getattr(exc, "worker_failures", {}).values():  # ray.train.WorkerGroupError
            found = find_user_error(inner)
            if found is not None:
                return found
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "cause", None)
    return None
