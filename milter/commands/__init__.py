"""Sub-commands of the `milter` CLI, one module each."""
