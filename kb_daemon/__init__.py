"""kb-daemon service core: configuration, database, queue, snapshots and the `kbctl` CLI.

Nothing here imports torch, transformers, the editor or the workers at module level, so that
`kbctl --help` is instant; commands that need a model import it inside the command.
"""

__version__ = "0.1.0"
