"""`python -m edge_agent.cli` runs the `edge-agent` command line."""

from edge_agent.cli import main

main()
