"""The trainer's user-facing errors: the CLI prints each as one line and exits with code 2."""


class TrainError(ValueError):
    """A training run that cannot start or continue as asked (bad resume, checkpoint dir in use...)."""


class NonFiniteLoss(TrainError):
    """Training stopped at a step whose loss or state was NaN or Infinity; nothing of it was saved."""
