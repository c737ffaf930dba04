"""python -m cli: the same as the installed `stt` command."""

from cli.app import main

main()
