"""One exception root for everything the user can fix; the CLI prints it in one line."""


class EngineError(Exception):
    """A problem the user can fix (bad job file, unreadable input, refused output)."""

    exit_code = 1


class JobError(EngineError):
    """The job file is invalid. Carries one message per problem."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


class InputError(EngineError):
    """The input cannot be read (missing file or column, no such bucket, bad credentials)."""


class OutputError(EngineError):
    """The output location cannot be used (written by another job, unwritable)."""


class BackendError(EngineError):
    """The model backend cannot start (missing package, model not found)."""


class ExportError(EngineError):
    """The answers cannot be exported in the asked format (e.g. note ids that are not integers for OMOP)."""
