"""The one exception type for mistakes a user can fix; only the CLI prints it."""


class UserError(Exception):
    """A problem the user caused, with the fix. Printed as one line, exit code 2."""

    def __init__(self, message: str, fix: str = ""):
        # A DataLoader worker re-raises us as UserError(<whole worker traceback>);
        # keep only our own last line so the CLI still prints one line.
        if "Original Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split("UserError: ", 1)[-1]
        self.message = message
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.message}: {self.fix}" if self.fix else self.message


class TrainingStopped(UserError):
    """The run stopped early on purpose (signal) or by necessity (non-finite loss, disk full)."""

    def __init__(self, message: str, fix: str = "", exit_code: int = 1):
        super().__init__(message, fix)
        self.exit_code = exit_code


class ParityError(UserError):
    """An exported file's output differs from PyTorch's beyond the tolerance (exit code 1: not a usage mistake)."""

    exit_code = 1
