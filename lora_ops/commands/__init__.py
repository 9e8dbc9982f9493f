"""Subcommands of `lora-ops`; every module here is discovered by `lora_ops.cli`."""
