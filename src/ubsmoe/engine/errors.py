"""What stops a run without being a bug or a bad input (imported by the CLI without the engine's weight)."""


class FederationStopped(RuntimeError):
    """A round cannot go on for a reason outside the code (too few clients answered): the run stops, its
    last checkpoint stays, and ``ubsmoe run --resume`` continues it once the clients answer again."""


class RunInterrupted(KeyboardInterrupt):
    """The user interrupted a run (Ctrl-C) in round ``round_index``; ``checkpoint_round`` is the round of the
    last checkpoint in the run's folder (0: none yet), from which ``ubsmoe run --resume`` continues."""

    def __init__(self, round_index: int, checkpoint_round: int):
        super().__init__(round_index, checkpoint_round)
        self.round_index, self.checkpoint_round = round_index, checkpoint_round


class ClientFault(Exception):
    """A client that did not deliver for a reason outside ubsmoe's code: its node went away or did not answer
    in time, its reply could not be admitted, or its training diverged (a non-finite loss). The round goes
    on without it (``failed_clients``). Any other exception from a client is a bug: it stops the run with
    its traceback unless ``federation.on_client_error=drop``."""


class ClientBug(RuntimeError):
    """A client's code raised in another process (a Flower ClientApp): its traceback, as the client sent it."""
