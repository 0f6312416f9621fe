"""The one exception type users see: a problem with their input, told in one line."""


class PipelineError(Exception):
    """A fatal problem with the user's input (missing folder, unknown backbone, bad flag, ...).

    The CLI prints its message on one line and exits with status 1; library callers catch it like any
    other exception.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a stage that kept what it had finished: the message says what was kept and
    the command that goes on. The CLI prints it and exits with status 130."""
