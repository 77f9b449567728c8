"""One module per `dynlm` subcommand, each with `register(subparsers)`."""
