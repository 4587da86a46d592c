"""Command-line entry points: each is argparse plus one call into the library."""
