class UserError(Exception):
    """A problem with what the user asked for (config, paths, checkpoints), not a bug.

    Demos print its message (which names the problem and the fix) and exit with status 2.
    """
