"""magne's version: the one place it is written (pyproject.toml reads it from here, `magne.__version__` is it).

Here, in the AMQP core, because the connection announces it to the broker (client properties) and the core imports
nothing above it; a constant rather than importlib.metadata, whose import (with the email package it pulls in) cost
18 ms of every worker's start-up (2026-12-06, -X importtime).
"""

VERSION = "0.1.0"
