"""Benchmarks behind ``vitscale bench WHAT``: one module per WHAT, each with ``main(args)`` that parses
``args.rest`` and prints its measurement beside a baseline, with the ratio."""
