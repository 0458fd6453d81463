"""The client commands of the `halos` CLI (feedback, models, runs, rounds, jobs, checkpoints).

The server's CLI (`server/cli.py`) owns the root `halos` command and mounts these with
`add_client_commands`; they use only `halos_client.Client`, never the server's code.
"""

from halos_client.cli.commands import add_client_commands

__all__ = ["add_client_commands"]
