"""The tools' command lines (argparse + a call into the package): tools/<name>.py and the
periln-* console scripts both run commands/<name>.py's main."""
