"""What stops a run without being a bug or a bad input (imported by the CLI without the engine's weight)."""


class FederationStopped(RuntimeError):
    """A round cannot go on for a reason outside the code (too few clients answered): the run stops, its
    last checkpoint stays, and ``ubsmoe run --resume`` continues it once the clients answer again."""
