"""User-facing errors.

A `UserError` is a mistake in the user's input (data, config, paths). The CLI prints its message and exits
with status 2, without a traceback. Anything else is a bug in chatrlhf and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message says what, where (file, line, field) and what was expected."""


class DataError(UserError):
    """A record or file of a dataset is malformed."""

    def __init__(self, source: str, where: str | None, field: str | None, problem: str):
        self.source, self.where, self.field, self.problem = source, where, field, problem
        loc = source if where is None else f"{source}:{where}"
        fld = "" if field is None else f" field '{field}':"
        super().__init__(f"{loc}:{fld} {problem}")


class ConfigError(UserError):
    """Config values that are invalid or conflict; the message names the fields."""


def first_in_file(errors: list[DataError]) -> DataError:
    """The error of the earliest record, by file and position in it (records are validated after the blend's
    shuffle, but a message should name the first bad record of a file, not a random one)."""

    def position(e: DataError) -> tuple[str, int]:
        number = (e.where or "").rpartition(" ")[2]
        return e.source, int(number) if number.isdigit() else 0

    return min(errors, key=position)
